"""One known line of Ray noise kept off the terminal, and nothing else.

Ray's core worker (C++, writing straight to the process's stderr, past Python's logging) reports at error level that
an actor "has constructor arguments in the object store and max_restarts > 0" (ray-project/ray#53727: a restart would
fail if those arguments were lost). Ray Data always puts an actor pool's constructor in the object store, and our
pools restart on purpose (scheduler/pipeline.py, ACTOR_MAX_RESTARTS), so every healthy run would print it as an error.
`ray_noise_filtered()` drops lines holding that notice from file descriptor 2 and passes every other byte through.
"""

import os
import re
import sys
import threading
from contextlib import contextmanager

NOISE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
                   rb"and max_restarts > 0")


@contextmanager
def ray_noise_filtered():
    """Within the block, stderr (fd 2: this process and the local Ray processes it starts) goes through a filter."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if not NOISE.search(line))
                if out:
                    os.write(original, out)
            if pending and not NOISE.search(pending):
                os.write(original, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe closes once no process holds it: the pump then drains and ends
        thread.join(timeout=2)  # a process that still holds it (a Ray process on its way out) is not waited for
        os.close(original)
