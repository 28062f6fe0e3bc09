#!/usr/bin/env bash
# The VLM stages' tests under the transformers release the vLLM environment gets
# (requirements-vlm.txt), without installing that environment: a side venv holds only that
# transformers and reads every other package from the project's .venv (a .pth file).
# Usage: tests/vlm_env/check.sh [pytest args]   (needs the package index once; then cached)
# HIC_TRANSFORMERS_VERSION=5.17.0 tests another release (e.g. the GPU machine's), with the
# packages it needs in other versions in HIC_VLM_ENV_EXTRA (e.g. "huggingface_hub<2").
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
version="${HIC_TRANSFORMERS_VERSION:-$(sed -n 's/^transformers==//p' "$root/requirements-vlm.txt")}"
venv="${VLM_ENV_VENV:-/tmp/hic-venv-transformers-$version}"
base="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" 2>/dev/null; then
    "$root/.venv/bin/python" -m venv --without-pip "$venv"
    own="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$base" > "$own/hic_base.pth"
    # The venv's own site-packages precede the .pth path, so this transformers shadows the base's.
    # shellcheck disable=SC2086  # HIC_VLM_ENV_EXTRA: a space-separated list of requirements
    "$root/.venv/bin/python" -m pip install --quiet --no-deps --target "$own" \
        "transformers==$version" ${HIC_VLM_ENV_EXTRA:-}
fi
"$venv/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
cd "$root"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_vlm.py tests/test_caption_scene.py "$@"
