"""The harvest's heap bounds (pipeline.allocator): writing chunk after chunk leaves the resident
set where it started, where glibc's defaults let it climb by ~200 MiB over 32 chunks."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A harvest's write loop without the model: 32 chunks of 4096 x 576 float16 (SmolLM2-135M's
# width, the default chunk shape) into a cache of 8 chunks per shard; prints the resident set
# (MiB) after the first chunk and after the last.
WRITE_LOOP = """
import sys
import numpy as np
from pipeline import allocator
bounded = sys.argv[1] == "bounded"
if bounded:
    allocator.bound_heap()
from pipeline.cache import CacheWriter

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

n_chunks, rows, hook = 32, 4096, "blocks.8.hook_resid_post"
writer = CacheWriter.create_or_resume(
    sys.argv[2], metadata={"model_name": "test"}, d_in={hook: 576},
    tokens=np.zeros((n_chunks * rows // 1024, 1024), np.int32), dtype="float16", chunk_tokens=rows,
    chunks_per_shard=8, n_holdout_chunks=1)
block = np.random.default_rng(0).standard_normal((rows, 576)).astype(np.float16)
for i in range(n_chunks):
    writer.write_chunk(i, {hook: block + np.float16(i)})
    if bounded:
        allocator.release_free_heap()
    if i == 0:
        first = rss_mib()
print(first, rss_mib())
"""


def _growth_mib(mode: str, out) -> float:
    done = subprocess.run([sys.executable, "-c", WRITE_LOOP, mode, str(out)], capture_output=True, text=True,
                          check=True, timeout=300)
    first, last = map(float, done.stdout.split())
    return last - first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is Linux's")
def test_chunk_writes_leave_the_heap_where_it_started(tmp_path):
    bounded = _growth_mib("bounded", tmp_path / "bounded")
    default = _growth_mib("default", tmp_path / "default")
    # 31 chunks of 4.7 MB each pass through the heap: bounded, nothing of them stays
    assert bounded < 32, f"resident set grew {bounded:.0f} MiB over 31 chunk writes (glibc defaults: {default:.0f})"
    # the glibc defaults the module works around (~195 MiB on Debian 12's glibc 2.36)
    assert default > bounded + 64, f"glibc defaults grew {default:.0f} MiB, bounded {bounded:.0f}"
