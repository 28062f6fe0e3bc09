import os

from hic.digests import cached_digest, file_digest


def test_cached_digest_follows_content_and_reuses_the_cache(tmp_path):
    listing, cache = tmp_path / "urls.csv", tmp_path / "cache/digests.json"
    listing.write_text("url\nhttp://a/1.jpg\n")
    first = cached_digest(listing, cache)
    assert first == file_digest(listing) and cache.exists()
    os.utime(listing, (1, 1))  # touched: the digest is computed again, and equal
    assert cached_digest(listing, cache) == first
    listing.write_text("url\nhttp://a/2.jpg\n")
    assert cached_digest(listing, cache) != first


def test_cached_digest_trusts_the_cache_for_an_unchanged_file(tmp_path):
    listing, cache = tmp_path / "urls.csv", tmp_path / "digests.json"
    listing.write_text("url\n")
    cached_digest(listing, cache)
    cache.write_text(cache.read_text().replace(file_digest(listing), "from-cache"))
    assert cached_digest(listing, cache) == "from-cache"  # no second read of a large list
