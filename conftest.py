"""Test-session settings that must be in place before torch is imported."""
import os
import tempfile

# OpenMP threads spin-wait by default; on a shared 2-core machine that made small ops crawl
# (a 24-token generation: 18 s spinning vs 0.8 s passive, measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The measured CPU matmul peak (MFU) is cached per machine: tests and the runs they start keep theirs
# out of the user's ~/.cache.
os.environ.setdefault("CMOE_CACHE_DIR", tempfile.mkdtemp(prefix="cmoe-test-cache-"))
