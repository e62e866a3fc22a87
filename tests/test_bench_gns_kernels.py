"""bench/gns_kernels.py on tiny-random: the probe's kernels counted against the bare step's."""

from __future__ import annotations

import json
import sys

from tests.helpers.runs import REPO, run_cmd


def test_gns_kernel_count_on_tiny_random(tmp_path):
    out = tmp_path / "gns_kernels.json"
    run_cmd([sys.executable, str(REPO / "bench" / "gns_kernels.py"), "--cfg", "cfg/tiny_test.yaml", "--set",
             "--out", str(out)])
    r = json.loads(out.read_text())
    hooks = r["by_hook"]
    # in the backward, one row-gradient matmul per module-call and nothing else (tiny-random: no
    # biases), in each microbatch holding a group with a reward signal
    in_backward = r["ops_by_hook"]["gns: capture hook (in the backward)"]
    assert set(in_backward) == {"bmm"} and in_backward["bmm"] % r["modules"] == 0
    assert 0 < in_backward["bmm"] <= r["modules"] * r["microbatches"]
    assert not {"index", "nonzero", "_local_scalar_dense"} & set(r["ops_by_hook"]["gns: on_after_backward"])
    assert r["kernels_bare_step"] > 0 and r["kernels_probe"] == r["kernels_probed_step"] - r["kernels_bare_step"]
    # the hooks' kernels are the probe's, apart from the reduce's packing of its stats
    assert 0 < sum(hooks.values()) == r["kernels_in_probe_hooks"] <= r["kernels_probe"]
    assert r["probe_over_bare"] == r["kernels_probe"] / r["kernels_bare_step"]
