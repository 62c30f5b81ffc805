"""Named moments at which a test can make the process die, as a SIGKILL from outside would: proof that a crash
there loses nothing (tests/test_reliability.py resumes after each and compares with an uninterrupted run).

ASYM_FAILPOINT=name[@k] kills the process (SIGKILL, no clean-up, no atexit) the k-th time (default: the first)
it reaches `failpoint(name)`. Unset, a failpoint costs one dictionary lookup.

    step               after an optimizer step's backward, before the optimizer updates anything
    checkpoint-write   inside a checkpoint write: the temporary file written, not yet synced or renamed
    knn                inside the kNN evaluation: the memory bank's features extracted, the queries not
"""
import os
import signal

WANTED = os.environ.get("ASYM_FAILPOINT", "")
_hits = {}


def failpoint(name: str):
    if not WANTED:
        return
    want, _, k = WANTED.partition("@")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(k or 1):
        os.kill(os.getpid(), signal.SIGKILL)
