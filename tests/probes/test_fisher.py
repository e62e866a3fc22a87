"""Fisher-kernel probe: exact blocks against a loop of per-sequence backward passes, the
contributions c_j against δH₁ of the real update, the files it writes."""

import json
import math

import numpy as np
import pytest
import torch

from probes.fisher import FisherProbe
from probes.functional import fisher as FF
from rl_training import policy
from tests.helpers.runs import run_in_process, train_log

ALL_LINEAR = "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
FISHER_ONLY = "probes.probes=[{name: fk, kind: fisher, options: {batch_size: 8, microbatch_size: 3}}]"


def _session(*overrides):
    from rl_training.config import load_config
    from rl_training.dist import DistInfo
    from rl_training.session import build_session
    from tests.helpers.runs import TINY

    return build_session(load_config(TINY, list(overrides)), DistInfo())


def _padded_batch(eos: int, vocab: int) -> policy.TokenBatch:
    """7 rows: prompts of 2–6 tokens left-padded, completions of 1–9 tokens right-padded, some
    ending at an EOS inside the batch width."""
    gen = torch.Generator().manual_seed(3)
    P, L = 6, 9
    prompt_len, comp_len = [2, 6, 4, 3, 6, 5, 2], [9, 3, 1, 7, 9, 5, 2]
    pid = torch.zeros(7, P, dtype=torch.long)
    pm = torch.zeros(7, P, dtype=torch.long)
    cid = torch.zeros(7, L, dtype=torch.long)
    cm = torch.zeros(7, L, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_len, comp_len)):
        pid[i, P - p:] = torch.randint(5, vocab, (p,), generator=gen)
        pm[i, P - p:] = 1
        cid[i, :c] = torch.randint(5, vocab, (c,), generator=gen)
        cm[i, :c] = 1
        if c < L and i % 2 == 0:
            cid[i, c - 1] = eos  # ended by EOS
    return policy.TokenBatch(pid, pm, cid, cm)


def _brute_force_rows(model, tokens: policy.TokenBatch, temperature: float) -> torch.Tensor:
    """[n, params] ∇S of each row alone (no padding), one backward per row."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    model.eval()
    for i in range(len(tokens.prompt_ids)):
        row = policy.trim(*tokens.rows(slice(i, i + 1)))
        lp = policy.token_logprobs(policy.completion_logits(model, *row, temperature), row.completion_ids)
        grads = torch.autograd.grad((lp * row.completion_mask).sum(), params)
        out.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(out)


@pytest.mark.parametrize("precondition", [False, True])
def test_exact_kernel_equals_a_loop_of_per_sequence_backwards(precondition):
    s = _session(ALL_LINEAR, FISHER_ONLY)
    tr, probe = s.trainer, s.trainer.probes.probes[0]
    model = tr.policy
    with torch.no_grad():  # LoRA B ≠ 0, so that A has a gradient too
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    assert len(probe.names) == 2 * 7 * 2, "LoRA A and B on all 7 linear layers of 2 blocks"
    D = None
    if precondition:  # Adam state from two real steps of some loss
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(2):
            loss = sum((p * p).sum() * (i + 1) for i, p in enumerate(params))
            tr.optimizer.zero_grad()
            loss.backward()
            tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        D = FF.adam_preconditioner(tr.optimizer, dict(probe_named(model)))
        assert D is not None
    tokens = _padded_batch(tr.tokenizer.eos_token_id, len(tr.tokenizer))
    rows, _, _ = probe.sequence_gradients(model, None, tokens, torch.zeros(0))
    local, sketch = probe.kernel(rows, D, step=1)
    assert sketch is None, "one rank: nothing is sketched"
    G = _brute_force_rows(model, tokens, s.cfg.rollout.temperature)
    w = torch.cat([D[n].reshape(-1) for n, _ in probe_named(model)]) if D is not None else torch.ones(G.shape[1])
    want = (G * w) @ G.T
    assert local.shape == (7, 7)
    assert float((local - want).abs().max() / want.abs().max()) <= 1e-5


def probe_named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("optimizer,clip,micro", [("sgd", 0, 3), ("adamw", 0, 3), ("sgd", 1e-3, 3), ("adamw", 1e-3, 3),
                                                  ("adamw", 0, 8)])
def test_contributions_sum_to_delta_h_of_the_real_update(monkeypatch, optimizer, clip, micro):
    """SGD, and Adam's first step without weight decay, move θ along Σ_j −A_j D∇S_j/(N·L)·η·c
    (c: the clipping factor; grad_clip 1e-3 clips every step here): Σ_j c_j equals δH₁ of the
    real Δθ, and the probe's δH₁ equals the δH probe's (shared E-batch). With the E-batch in one
    microbatch its baseline comes from that microbatch's own forward: no extra pass."""
    s = _session("probes.probes=[{name: dh, kind: delta_h, options: {batch_size: 8}},"
                 f" {{name: fk, kind: fisher, options: {{batch_size: 8, microbatch_size: {micro}}}}}]",
                 f"train.grad_clip={clip}", "train.weight_decay=0")
    forwards = []  # the E microbatches' forwards (the U pass has its own)
    terms = FisherProbe._terms
    monkeypatch.setattr(FisherProbe, "_terms", lambda self, *a: forwards.append(1) or terms(self, *a))
    tr = s.trainer
    lr = tr.lr_scheduler.get_last_lr()[0]
    if optimizer == "sgd":
        tr.optimizer = torch.optim.SGD(list(tr.trainable.values()), lr=lr)
        tr.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda _: 1.0)  # steps the SGD, same lr
    out = tr.train_step().metrics
    assert out["probe/fk/preconditioned"] == float(optimizer == "adamw")
    assert out["probe/fk/pred"] == pytest.approx(out["probe/dh/pred"], rel=1e-5)
    assert out["probe/fk/contrib_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert out["probe/fk/contrib_up"] > 0 > out["probe/fk/contrib_down"]
    assert tr.probes.probes[0].ebatches.generations == 1, "δH and Fisher share one E-batch"
    assert len(forwards) == (1 if micro == 8 else 2 * 3), "B_E ≤ microbatch: no pass of its own for the baseline"


def test_f_is_declared_without_storage_and_summed_where_it_is_computed():
    """F's declaration holds its size only (a host default would be 592 MB at the user's shape):
    the due step sets it, and the exchange sums that value."""
    tr = _session(FISHER_ONLY).trainer
    probe = tr.probes.probes[0]
    assert probe.statset.declared["F"].default.is_meta
    tr.train_step()
    F = probe.stats["F"]
    assert F.device.type == "cpu" and F.numel() == sum(p.numel() for p in tr.trainable.values())
    assert float(F.abs().sum()) > 0


def test_blocks_and_top_sequences_are_written(tmp_path):
    run = run_in_process(tmp_path, "train.total_steps=1",
                         "probes.probes=[{name: fk, kind: fisher, options: {batch_size: 8, top_eigenvalues: 3}}]")
    (row,) = train_log(run)
    with np.load(run / "fisher" / "step_1.npz") as z:
        assert z["K_uu"].shape == (8, 8) and z["K_ee"].shape == (8, 8) and z["K_eu"].shape == (8, 8)
        assert z["exact_uu"].all() and z["exact_eu"].all()
        np.testing.assert_allclose(z["K_uu"], z["K_uu"].T, rtol=1e-12)
        assert np.all(np.linalg.eigvalsh(z["K_uu"]) > -1e-9 * z["K_uu"].trace()), "a Gram matrix is PSD"
        assert z["contrib"].sum() == pytest.approx(row["probe/fk/contrib_sum"], rel=1e-9)
        assert np.diag(z["K_uu"]).mean() == pytest.approx(row["probe/fk/uu_diag_mean"], rel=1e-9)
        assert np.linalg.eigvalsh(z["K_uu"])[-1] == pytest.approx(row["probe/fk/uu_eig_1"], rel=1e-9)
        assert list(z["meta_columns"]) == ["rank", "kind", "prompt", "reward", "advantage", "length"]
        assert len(set(z["u_ids"].tolist())) == 2, "two prompt groups of 4"
    top = json.loads((run / "fisher" / "step_1_top.json").read_text())
    assert top["raising"] and top["lowering"]
    assert all(r["c"] > 0 for r in top["raising"]) and all(r["c"] < 0 for r in top["lowering"])
    assert {"id", "text", "advantage", "reward", "length"} <= set(top["raising"][0])
    assert (run / "fisher" / "step_1.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "probe/fk/kernel_cosine" in events.Tags()["images"]
    assert math.isfinite(row["probe/fk/uu_effective_rank"]) and row["probe/fk/exact_frac"] == 1.0


SEEDS = 96  # sketch seeds of the variance check
SKETCH_ONLY = ("probes.probes=[{name: fk, kind: fisher, options: {batch_size: 8, microbatch_size: 3, mode: sketch, "
               "preconditioner: none, sketch_factors: [4, 3]}}]")


def _perturbed(*overrides):
    s = _session(ALL_LINEAR, *overrides)
    with torch.no_grad():  # LoRA B ≠ 0, so that A has a gradient too (the same in every session)
        for n, p in s.trainer.policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    return s


def test_sketch_mode_rows_are_sketches_of_the_exact_gradients_and_entries_have_the_stated_variance():
    """mode sketch (Qwen scale: the exact rows would not fit): each sequence's gradient is sketched
    in the hook from x and δ, and equals the Kronecker sketch of the exact mode's per-sequence
    gradient, and the hooks' contraction with a vector F is ⟨F, ∇S_j⟩ of the exact gradient; over
    the sketch seeds the kernel's errors have mean square 1 in units of the stated variance
    Σ_param kronecker_variance."""
    ex, sk = _perturbed(FISHER_ONLY), _perturbed(SKETCH_ONLY)
    pe, ps = ex.trainer.probes.probes[0], sk.trainer.probes.probes[0]
    tokens = _padded_batch(ex.trainer.tokenizer.eos_token_id, len(ex.trainer.tokenizer))
    rows, _, _ = pe.sequence_gradients(ex.trainer.policy, None, tokens, torch.zeros(0))
    K, _ = pe.kernel(rows, None, step=1)
    n = 7
    var = FF.kronecker_variance_matrix(rows, 4, 3, n)
    z2 = []
    gen = torch.Generator().manual_seed(5)
    F_all = {name: torch.randn(rows[name].shape[1:], generator=gen) for name in pe.names}
    for seed in range(SEEDS):
        sketch = FF.KroneckerSketch(seed, 4, 3)
        sketched, _, dots = ps.sequence_gradients(sk.trainer.policy, None, tokens, torch.zeros(0), sketch,
                                                  F_all if seed == 0 else None)
        if seed == 0:
            for name in pe.names:
                want = sketch.project(name, rows[name][:n])
                torch.testing.assert_close(sketched[name][:n].double(), want, rtol=1e-4,  # held in float32
                                           atol=1e-4 * float(want.abs().max()))
            want = sum(rows[name][:n].double().reshape(n, -1) @ F_all[name].double().reshape(-1) for name in pe.names)
            torch.testing.assert_close(dots, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        Ks, _ = ps.kernel(sketched, None, step=1)
        iu = torch.triu_indices(n, n)
        z2.append(((Ks[:n, :n] - K[:n, :n]) ** 2 / var)[iu[0], iu[1]])
    z2 = torch.cat(z2)
    # Entries of one seed share R: the per-seed means spread ≈ 1.0, so the mean's SE is ≈ 0.1
    # (measured: 0.997).
    assert 0.75 < float(z2.mean()) < 1.3, float(z2.mean())


def test_sketch_mode_contributions_equal_the_exact_modes():
    """mode sketch never forms a sequence's gradient, but its hooks contract F with the
    sequence's x_t and δ_t: the same c_j, row by row, as mode exact on the same step (D off in
    both; their E rows' sketches do not enter)."""
    runs = []
    for mode in ("exact", "sketch"):
        s = _session("probes.probes=[{name: fk, kind: fisher, options: {batch_size: 8, microbatch_size: 3, "
                     f"mode: {mode}, preconditioner: none}}}}]")
        out = s.trainer.train_step().metrics
        runs.append((out, s.trainer.probes.probes[0].results()["contrib"]))
    (exact, c_exact), (sketch, c_sketch) = runs
    assert sketch["probe/fk/exact_frac"] == 0.0 and exact["probe/fk/exact_frac"] == 1.0
    assert len(c_exact) == 8 and float(c_exact.abs().min()) > 0
    torch.testing.assert_close(c_sketch, c_exact, rtol=1e-5, atol=1e-6 * float(c_exact.abs().max()))
    assert sketch["probe/fk/contrib_ratio"] == pytest.approx(exact["probe/fk/contrib_ratio"], rel=1e-5)


def test_sketch_mode_in_the_loop_and_its_refusal_of_adams_preconditioner():
    from rl_training.errors import ConfigError

    with pytest.raises(ConfigError, match="mode sketch cannot apply Adam's D"):
        _session(SKETCH_ONLY.replace("preconditioner: none, ", ""))
    out = _session(SKETCH_ONLY).trainer.train_step().metrics
    assert out["probe/fk/exact_frac"] == 0.0 and out["probe/fk/preconditioned"] == 0.0
    assert math.isfinite(out["probe/fk/pred"]) and math.isfinite(out["probe/fk/contrib_ratio"])
    assert out["probe/fk/uu_diag_mean"] > 0
