from hic.duck import connect


def test_connection_is_bounded_to_the_jobs_threads_and_memory():
    con = connect(threads=1, memory_mb=1000)
    assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
    limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    assert limit.startswith("76") and limit.endswith("MiB")  # 800 MB written as MiB
    unbounded = connect()
    assert unbounded.execute("SELECT current_setting('threads')").fetchone()[0] >= 1
