"""Circuit discovery: tasks, patching, faithfulness, output, CLI — checked on a toy model whose
circuit is known (a three-layer, one-head-per-layer attention-only transformer trained to do
induction, stored in fixtures/toy_induction; which heads form the circuit is read off their
attention patterns, not assumed)."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from attnlab.circuits.circuit import (
    Circuit,
    circuit_figure,
    discover,
    load_circuit,
    protected_heads,
    save_circuit,
    scores_tensor,
    select_circuit,
    verify_edges,
)
from attnlab.circuits.faithfulness import (
    FaithfulnessError,
    curve_summary,
    faithfulness,
    faithfulness_curve,
    rank_heads,
    smallest_reaching,
)
from attnlab.circuits.patching import (
    PatchingError,
    _decoder_layers,
    _final_norm,
    activation_patching,
    attribution_patching,
    forward,
    path_patching,
    task_metrics,
)
from attnlab.circuits.tasks import (
    TaskError,
    check_task,
    greater_than_task,
    induction_task,
    ioi_task,
    jsonl_task,
    load_task,
)
from attnlab.circuits.toy import (
    known_circuit,
    load_induction_model,
    pattern_scores,
    train_induction_model,
)
from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.models import tiny_model

PREV, IND, OTHER = (0, 0), (1, 0), (2, 0)


# ---------------------------------------------------------------------------------------
# the toy whose circuit is known
# ---------------------------------------------------------------------------------------
TOY_DIR = Path(__file__).parent / "fixtures" / "toy_induction"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # a STORED trained toy (see fixtures/toy_induction/README.md): training is chaotic (a 1e-13
    # change of the initial weights changes the trained model), so a model trained here would
    # depend on the CPU's float rounding, and so would every number below; on fixed weights a
    # forward/backward differs between CPUs only by rounding that nothing amplifies
    toy = load_induction_model(TOY_DIR)
    toy.path = tmp_path_factory.mktemp("toy") / "model"  # a copy for the CLI, which loads it by path
    shutil.copytree(TOY_DIR, toy.path, ignore=shutil.ignore_patterns("README.md"))
    return toy


@pytest.fixture(scope="module")
def toy_task(toy):
    return induction_task(vocab=(1, toy.vocab), n=8, length=8, bos=0)


def test_toy_grows_previous_token_and_induction_heads():
    # training itself, independently of the stored toy: all 700 steps whatever the machine's
    # load (a time cut-off would make the trained model depend on how busy the cores were)
    toy = train_induction_model(max_seconds=float("inf"))
    assert len(toy.losses) == 700
    assert toy.losses[-1] < 0.3 < 3.0 < toy.losses[0]
    prev, ind = pattern_scores(toy)
    # independently of any patching: head 0.0 attends to the previous token, head 1.0 to the
    # token after the earlier occurrence of the current one; the live head 2.0 does neither
    assert prev[PREV] > 0.5 and ind[IND] > 0.4
    assert prev.flatten().topk(2).values[1] < 0.2 and ind.flatten().topk(2).values[1] < 0.2
    nodes, edges = known_circuit(toy)
    assert nodes == [PREV, IND] and edges == [(PREV, IND), (IND, "logits")]


def test_the_stored_toy_has_the_known_circuit(toy):
    # the tests below rely on it: layer 0 the previous-token head, layer 1 the induction head
    prev, ind = pattern_scores(toy)
    assert prev[PREV] > 0.5 and ind[IND] > 0.4
    assert prev.flatten().topk(2).values[1] < 0.2 and ind.flatten().topk(2).values[1] < 0.2
    nodes, edges = known_circuit(toy)
    assert nodes == [PREV, IND] and edges == [(PREV, IND), (IND, "logits")]


def _precision_recall(found, truth):
    found, truth = set(found), set(truth)
    hit = len(found & truth)
    return hit / max(len(found), 1), hit / len(truth)


@pytest.mark.parametrize("method", ["attribution", "ig", "activation"])
def test_discovery_recovers_the_induction_circuit(toy, toy_task, method):
    # the truth comes from the attention patterns (`known_circuit`), not from any patching
    truth_nodes, truth_edges = known_circuit(toy)
    circuit = discover(toy.model, toy_task, method=method, faithfulness=False)  # default threshold
    assert _precision_recall(circuit.nodes, truth_nodes) == (1.0, 1.0)
    assert OTHER not in circuit.nodes  # a live head outside the circuit is left out
    if method != "activation":  # edges come from gradients
        # head -> head and head -> logits: exactly prev -> induction and induction -> logits,
        # not prev -> logits (the previous-token head acts only through the induction head)
        assert _precision_recall(circuit.edges, truth_edges) == (1.0, 1.0)
        assert _precision_recall(circuit.head_edges(), [(PREV, IND)]) == (1.0, 1.0)
    assert circuit.clean_metric - circuit.corrupted_metric > 5


def test_attribution_tracks_activation_patching_on_the_toy(toy, toy_task):
    attr = attribution_patching(toy.model, toy_task)
    act = activation_patching(toy.model, toy_task)
    assert attr.clean_metric == pytest.approx(act.clean_metric, abs=1e-4)
    # each head of a serial circuit carries the whole effect (exact: 13.5 and 13.6), so only
    # the top two as a set is stable
    assert set(rank_heads(attr.nodes)[:2]) == set(rank_heads(act.nodes)[:2]) == {PREV, IND}
    # a linear estimate through the induction head's softmax: measured within 31 % here
    for head in (PREV, IND):
        assert float(attr.nodes[head]) == pytest.approx(float(act.nodes[head]), rel=0.35)
    assert abs(float(attr.nodes[OTHER])) < 0.1 * act.total_effect and abs(float(act.nodes[OTHER])) < 0.1 * act.total_effect
    # the edge from the previous-token head to the induction head carries its whole effect
    assert attr.edges[0, 0, 1, 0] == pytest.approx(float(attr.nodes[PREV]), rel=0.05)


def test_faithfulness_of_the_toy_circuit(toy, toy_task):
    circuit = discover(toy.model, toy_task)
    f = circuit.faithfulness
    assert f["circuit_f"] > 0.95 and abs(f["completeness"]) < 0.05
    assert f["smallest_at_level"] == 2
    assert f["f"][0] == pytest.approx(0.0) and f["f"][-1] == pytest.approx(1.0)
    # one mean per head over all positions (attnlab.probes.ablation's mean ablation) agrees here
    g = faithfulness_curve(toy.model, toy_task, rank_heads(attribution_patching(toy.model, toy_task).nodes),
                           means="global", circuit=circuit.nodes)
    assert g["circuit_f"] > 0.9 and g["smallest_at_level"] == 2
    with pytest.raises(FaithfulnessError, match="means"):
        faithfulness_curve(toy.model, toy_task, rank_heads(scores_tensor(circuit)), means="median")


def test_faithfulness_cut_takes_the_smallest_top_k_reaching_the_level(toy, toy_task):
    circuit = discover(toy.model, toy_task, cut="faithfulness")
    f = circuit.faithfulness
    ranking = rank_heads(attribution_patching(toy.model, toy_task, edges=False).nodes)
    k = f["smallest_at_level"]
    assert f["cut"] == "faithfulness" and f["cut_size"] == k == 2
    assert circuit.nodes == sorted(ranking[:k]) and f["circuit_f"] >= f["level"]
    direct = faithfulness_curve(toy.model, toy_task, ranking, sizes=[], circuit=circuit.nodes)
    assert f["circuit_f"] == pytest.approx(direct["circuit_f"]) and f["completeness"] == pytest.approx(direct["completeness"])
    # a higher level than any measured size reaches keeps every head, and says so
    every = discover(toy.model, toy_task, cut="faithfulness", level=10.0)
    assert every.faithfulness["smallest_at_level"] is None and len(every.nodes) == toy.model.n_layers * toy.model.n_heads
    with pytest.raises(AttnlabError, match="cut"):
        discover(toy.model, toy_task, cut="faithfulness", faithfulness=False)
    with pytest.raises(AttnlabError, match="cut must be"):
        discover(toy.model, toy_task, cut="magic")


def test_path_patching_verifies_the_toy_edges(toy, toy_task, tmp_path, capsys):
    act = activation_patching(toy.model, toy_task)
    total = act.total_effect
    # the previous-token head acts only through the induction head: its edge carries its whole
    # effect, its direct path to the logits almost none; the induction head acts on the logits
    prev_ind = path_patching(toy.model, toy_task, PREV, IND)
    assert prev_ind == pytest.approx(float(act.nodes[PREV]), rel=0.05) and prev_ind > 0.5 * total
    assert abs(path_patching(toy.model, toy_task, PREV, "logits")) < 0.05 * total
    assert path_patching(toy.model, toy_task, IND, "logits") == pytest.approx(float(act.nodes[IND]), rel=0.05)
    assert path_patching(toy.model, toy_task, PREV, IND, direction="noising") > 0.5 * total
    with pytest.raises(AttnlabError, match="earlier layer"):
        path_patching(toy.model, toy_task, IND, PREV)
    with pytest.raises(AttnlabError, match="outside"):
        path_patching(toy.model, toy_task, (0, 0), (7, 0))
    assert _clean_state(toy.model)
    # the CLI stores each edge's exact effect in circuit.json next to its score
    circuit = discover(toy.model, toy_task, faithfulness=False)
    checks = verify_edges(toy.model, toy_task, circuit)
    assert set(checks) == set(circuit.edges) and checks[(PREV, IND)] == pytest.approx(prev_ind)
    save_circuit(circuit, toy.model, tmp_path / "c")
    assert load_circuit(tmp_path / "c").edge_checks == pytest.approx(checks)


def test_noising_direction_and_metrics(toy, toy_task):
    clean, corr = task_metrics(toy.model, toy_task)
    noised = activation_patching(toy.model, toy_task, direction="noising")
    assert noised.clean_metric == pytest.approx(clean, abs=1e-4) and noised.corrupted_metric == pytest.approx(corr, abs=1e-4)
    # knocking out either head of the circuit in the clean run loses most of the behaviour
    assert noised.nodes[PREV] > 0.5 * (clean - corr) and noised.nodes[IND] > 0.5 * (clean - corr)
    with pytest.raises(PatchingError, match="direction"):
        activation_patching(toy.model, toy_task, direction="sideways")


# ---------------------------------------------------------------------------------------
# attribution is exact where the metric is linear in z
# ---------------------------------------------------------------------------------------
def test_attribution_equals_activation_patching_on_a_linear_toy():
    model = tiny_model("gpt2", n_layers=1, seed=3)
    with torch.no_grad():  # attention only (no MLP), larger weights so effects are not tiny
        for p in model.hf_model.transformer.h[0].mlp.parameters():
            p.zero_()
        model.hf_model.transformer.h[0].attn.c_attn.weight.mul_(10)
        model.hf_model.transformer.h[0].attn.c_proj.weight.mul_(10)
    norm = _final_norm(model)
    object.__setattr__(norm, "forward", types.MethodType(lambda self, x, *a, **k: x, norm))  # logits linear in z
    task = induction_task(vocab=(100, 5000), n=3, length=6, seed=1)
    attr = attribution_patching(model, task, edges=False)
    act = activation_patching(model, task)
    assert act.nodes.abs().max() > 1e-2
    assert torch.allclose(attr.nodes, act.nodes, atol=1e-4, rtol=1e-3)
    noised_attr = attribution_patching(model, task, direction="noising", edges=False)
    noised_act = activation_patching(model, task, direction="noising")
    assert torch.allclose(noised_attr.nodes, noised_act.nodes, atol=1e-4, rtol=1e-3)
    # head -> logits edges: path patching is the exact quantity the edge score estimates linearly
    with_edges = attribution_patching(model, task)
    exact = torch.tensor([path_patching(model, task, (0, h), "logits") for h in range(model.n_heads)])
    assert torch.allclose(exact, with_edges.logit_edges[0], atol=1e-4, rtol=1e-3)
    assert torch.allclose(exact, act.nodes[0], atol=1e-4, rtol=1e-3)  # one layer: the edge is the head's whole effect


# ---------------------------------------------------------------------------------------
# hooks and routing are always removed
# ---------------------------------------------------------------------------------------
def _clean_state(model):
    layers_ok = all(not m._forward_pre_hooks for m in _decoder_layers(model))
    norm_ok = not _final_norm(model)._forward_pre_hooks
    routed = any("forward" in block.attn.__dict__ for block in model.bridge.blocks)
    return layers_ok and norm_ok and not routed and model.hf_model.config._attn_implementation != "attnlab"


def test_hooks_removed_after_success_and_error(tiny_llama):
    ids = torch.randint(100, 1000, (2, 6))
    before = tiny_llama.bridge(ids)
    trace = forward(tiny_llama, ids)
    assert len(trace.z) == 2 and trace.resid_final is not None and _clean_state(tiny_llama)
    bad = {1: ([0], torch.zeros(2, 5, 4, 16))}  # wrong length: the routed function raises mid-forward
    with pytest.raises(PatchingError, match="shape"):
        forward(tiny_llama, ids, patch=bad)
    assert _clean_state(tiny_llama)
    assert torch.allclose(tiny_llama.bridge(ids), before, atol=1e-5)
    task = induction_task(vocab=(100, 1000), n=2, length=5)
    attribution_patching(tiny_llama, task)
    assert _clean_state(tiny_llama)


# ---------------------------------------------------------------------------------------
# faithfulness arithmetic on hand-made numbers
# ---------------------------------------------------------------------------------------
def test_faithfulness_arithmetic():
    assert faithfulness(3.0, m_empty=1.0, m_full=5.0) == pytest.approx(0.5)
    assert faithfulness([1.0, 4.2, 5.0, 6.0], 1.0, 5.0) == pytest.approx([0.0, 0.8, 1.0, 1.25])
    assert faithfulness(-1.0, m_empty=-3.0, m_full=-5.0) == pytest.approx(-1.0)
    with pytest.raises(FaithfulnessError, match="undefined"):
        faithfulness(1.0, 2.0, 2.0)
    assert smallest_reaching([0, 1, 2, 4], [0.0, 0.5, 0.79, 0.9]) == 4
    assert smallest_reaching([4, 2, 0, 1], [0.9, 0.85, 0.0, 0.5]) == 2
    assert smallest_reaching([0, 1], [0.0, 0.3]) is None
    s = curve_summary([0, 2, 4], [0.0, 1.0, 1.0], n_total=4)
    assert s["cpr"] == pytest.approx(0.75) and s["cmd"] == pytest.approx(0.25)
    assert rank_heads(torch.tensor([[0.1, 0.5], [0.5, -1.0]])) == [(0, 1), (1, 0), (0, 0), (1, 1)]


def test_select_circuit_thresholds():
    from attnlab.circuits.patching import Scores

    nodes = torch.tensor([[4.0, 1.0], [10.0, 6.0]])
    edges = torch.zeros(2, 2, 2, 2)
    edges[0, 0, 1, 0], edges[0, 0, 1, 1], edges[0, 1, 1, 0] = 8.0, 2.0, 9.0
    logit_edges = torch.tensor([[0.0, 0.0], [10.0, 6.0]])
    scores = Scores(nodes, "attribution", "denoising", 12.0, 2.0, edges=edges, logit_edges=logit_edges)
    c = select_circuit(scores, threshold=0.5)
    assert c.nodes == [(1, 0), (1, 1)] and c.edges == [((1, 0), "logits"), ((1, 1), "logits")]
    c = select_circuit(scores, threshold=0.3)
    assert c.nodes == [(0, 0), (1, 0), (1, 1)]
    assert set(c.head_edges()) == {((0, 0), (1, 0))}  # 2.0 < 0.3 * 10; (0, 1) is not a node
    assert protected_heads(c) == [(0, 0), (1, 0), (1, 1)]


# ---------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------
def test_builtin_tasks_build_on_the_project_tokenizer(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    ioi = ioi_task(tok, n=6)
    for ex in ioi.examples:
        assert ex.clean.shape == ex.corrupted.shape and (ex.clean != ex.corrupted).sum() == 1
        assert ex.correct != ex.wrong
        assert tok.decode([ex.correct]).strip() in tok.decode(ex.clean)
    with pytest.raises(TaskError, match="Zyxwvutsrq"):
        ioi_task(tok, names=["Ada", "Bruno", "Zyxwvutsrq"])
    gt = greater_than_task(tok, n=4)
    for ex in gt.examples:
        assert int(tok.decode([ex.correct])) == int(tok.decode([ex.wrong])) + 2
    ind = induction_task(vocab=(10, 40), n=3, length=6, bos=1)
    ex = ind.examples[0]
    assert ex.clean[0] == 1 and torch.equal(ex.clean[1:6], ex.clean[7:12]) and ex.correct == int(ex.clean[6])
    assert int(ex.wrong) not in ex.clean.tolist() and (ex.clean != ex.corrupted).sum() == 1
    assert [g[0].shape[0] for g in ioi.groups()] and sum(g[0].shape[0] for g in ioi.groups()) == 6
    with pytest.raises(TaskError, match="unknown task"):
        load_task(tiny_gpt2, "nonsense", check=False)


def test_needle_task_corrupts_only_the_passkey(tiny_llama):
    task = load_task(tiny_llama, "needle", n=3, check=False)
    assert task.name == "needle" and len(task) == 3
    for ex in task.examples:
        changed = (ex.clean != ex.corrupted).nonzero().flatten().tolist()
        assert changed and changed == list(range(changed[0], changed[-1] + 1))  # one contiguous span
        assert ex.correct == int(ex.clean[changed[0]]) and ex.wrong == int(ex.corrupted[changed[0]]) != ex.correct
        digits = {tiny_llama.tokenizer.decode([int(t)]) for t in ex.clean[changed[0]:changed[-1] + 1]}
        assert all(d.isdigit() for d in digits)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_task_errors_name_the_line(tiny_gpt2, tmp_path):
    tok = tiny_gpt2.tokenizer
    good = {"clean": "When Ada and Bruno met, Bruno waved to", "corrupted": "When Ada and Bruno met, Chen waved to",
            "correct": " Ada", "wrong": " Bruno"}
    task = jsonl_task(tok, _write(tmp_path / "ok.jsonl", [good, good]))
    assert len(task) == 2 and task.examples[1].label == "line 2"
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "wrong"}, "missing.*'wrong'"),
        "length": ({**good, "corrupted": "When Ada and Bruno met, Chen Chen waved to"}, "same length"),
        "multi": ({**good, "correct": " Ada Lovelace"}, "not one"),
        "json": ("{not json", "not valid JSON"),
    }
    for name, (row, message) in cases.items():
        path = _write(tmp_path / f"{name}.jsonl", [good, row])
        with pytest.raises(TaskError, match=rf"{name}\.jsonl:2: .*{message}"):
            jsonl_task(tok, path)
    same = _write(tmp_path / "same.jsonl", [good, {**good, "corrupted": good["clean"]}])
    with pytest.raises(TaskError, match="line 2: the clean and corrupted logit differences are equal"):
        check_task(tiny_gpt2, jsonl_task(tok, same))



def exit_code(argv: list[str]) -> int:
    """`attnlab.cli.main`'s exit status, also when argparse refuses a value (``SystemExit(2)``)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)

# ---------------------------------------------------------------------------------------
# output and CLI
# ---------------------------------------------------------------------------------------
def test_circuit_json_figure_and_protected_heads(toy, toy_task, tmp_path):
    from attnlab.runs import Run
    from attnlab.sparsity_stats import PolicyGenerator

    circuit = discover(toy.model, toy_task)
    path = save_circuit(circuit, toy.model, tmp_path / "run")
    obj = json.loads(path.read_text())
    assert {n["name"] for n in obj["nodes"]} == {"L0.H0", "L1.H0"}
    assert {"from": "L0.H0", "to": "L1.H0"} == {k: obj["edges"][0][k] for k in ("from", "to")}
    assert obj["method"] == "attribution" and obj["task"]["name"] == "induction" and len(obj["scores"]) == 3
    assert obj["faithfulness"]["smallest_at_level"] == 2
    run = Run.open(tmp_path / "run")
    assert "circuit" in run.manifest["stages"]
    again = load_circuit(tmp_path / "run")
    assert isinstance(again, Circuit) and again.edges == circuit.edges
    assert protected_heads(again) == [PREV, IND] == protected_heads(obj)
    gen = PolicyGenerator(protected_heads=protected_heads(again))
    assert tuple(gen.protected_heads) == (PREV, IND)
    fig = circuit_figure(circuit, n_layers=3, n_heads=1)
    assert len(fig.data) == len(circuit.edges) + 1 and list(fig.data[-1].text) == ["L0.H0", "L1.H0", "logits"]


def test_cli_circuit_on_a_jsonl_task(toy, toy_task, tmp_path, capsys):
    def text(ids):
        return " ".join(f"t{int(i)}" for i in ids[1:])  # the tokenizer adds the BOS itself

    rows = [{"clean": text(e.clean), "corrupted": text(e.corrupted), "correct": f"t{e.correct}", "wrong": f"t{e.wrong}"}
            for e in toy_task.examples]
    task_file = _write(tmp_path / "induction.jsonl", rows)
    out = tmp_path / "run"
    assert main(["circuit", "--model", str(toy.path), "--task", str(task_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "L0.H0->L1.H0" in printed and "smallest circuit reaching 0.8: 2" in printed
    assert protected_heads(load_circuit(out)) == [PREV, IND]
    assert exit_code(["circuit", "--model", str(toy.path), "--task", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert exit_code(["circuit", "--model", str(toy.path), "--task", str(task_file), "--method", "magic", "--out", str(tmp_path / "y")]) == 2
    assert exit_code(["circuit", "--model", str(toy.path), "--task", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "unknown task 'nonsense'" in err and "--method" in err and "does not exist" in err
    assert not any((tmp_path / name).exists() for name in "xyz")


# ---------------------------------------------------------------------------------------
# the embedded model
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ioi_on_the_embedded_model(embedded):
    from attnlab.circuits.tasks import IOI_TEMPLATES

    task = ioi_task(embedded.tokenizer, n=4, templates=IOI_TEMPLATES[:1])  # one length: one batch
    check_task(embedded, task)  # clean != corrupted for every example
    scores = attribution_patching(embedded, task, edges=False)
    assert scores.nodes.shape == (30, 9)
    assert scores.clean_metric > scores.corrupted_metric + 1.0  # the model prefers the indirect object
    exact = activation_patching(embedded, task, heads=rank_heads(scores.nodes)[:2])
    assert (exact.nodes > 0).sum() == 2  # the top attributed heads do carry the behaviour


@pytest.mark.slow
def test_needle_task_on_the_embedded_model(embedded):
    from attnlab.circuits.tasks import needle_task

    task = needle_task(embedded, n=2, length=256)
    clean, corrupted = check_task(embedded, task)
    # the model copies the passkey from its context: the clean one, and after corruption the other
    assert (clean > 1).all() and (corrupted < -1).all()


# ---------------------------------------------------------------------------------------
# the stored circuit: read through the run store and checked in one place
# ---------------------------------------------------------------------------------------
def _stored_circuit(tmp_path, **changes):
    from attnlab.runs import CIRCUIT, ensure_run

    run = ensure_run(tmp_path / "run", {"name": "m", "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 4}, "test", {})
    circuit = Circuit(nodes=[(0, 1), (1, 0)], edges=[((0, 1), (1, 0)), ((1, 0), "logits")],
                      node_scores={(0, 1): 1.0, (1, 0): 0.5}, edge_scores={((0, 1), (1, 0)): 0.7, ((1, 0), "logits"): 0.4},
                      method="attribution", direction="denoising", threshold=0.5,
                      faithfulness={"sizes": [0, 2], "f": [0.0, 1.0]})
    obj = {**circuit.to_json(), **changes}
    run.write(CIRCUIT, obj)
    return run, circuit


def test_load_circuit_reads_through_the_run_store(tmp_path):
    from attnlab.circuits.circuit import read_circuit
    from attnlab.runs import CIRCUIT

    run, circuit = _stored_circuit(tmp_path)
    for source in (run, run.path, str(run.path), run.path / CIRCUIT):
        again = load_circuit(source)
        assert again.nodes == circuit.nodes and again.edges == circuit.edges and again.edge_scores == circuit.edge_scores
    assert read_circuit(run).to_json()["nodes"][0]["name"] == "L0.H1"
    copy = tmp_path / "copy.json"  # a standalone copy, outside any run
    copy.write_text((run.path / CIRCUIT).read_text())
    assert load_circuit(copy).nodes == circuit.nodes
    # a refinement stored without the faithfulness curve (--no-faithfulness --refine) is fine
    refined = {"refined": {"mode": "prune", "sizes": [2, 1], "f": [1.0, 0.4]}}
    assert load_circuit(_stored_circuit(tmp_path / "r", faithfulness=refined)[0]).faithfulness == refined


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text("{not json"), "is not valid JSON"),
        (lambda p: p.write_text(json.dumps({"schema": 1, "nodes": [{"layer": 0, "head": 1}]})), "is not a circuit attnlab can read \\(missing field"),
        (lambda p: p.write_text(json.dumps([1, 2])), "not an object"),
        (lambda p: p.unlink(), "attnlab circuit --task"),
    ],
)
def test_a_damaged_circuit_is_one_error_naming_the_fix(tmp_path, damage, message):
    from attnlab.errors import RunError
    from attnlab.runs import CIRCUIT

    run, _ = _stored_circuit(tmp_path)
    damage(run.path / CIRCUIT)
    with pytest.raises(RunError, match=message) as info:
        load_circuit(run.path)
    assert "\n" not in str(info.value)


def test_a_circuit_that_does_not_fit_its_run_is_refused(tmp_path):
    from attnlab.errors import RunError

    nodes = [{"layer": 5, "head": 0, "name": "L5.H0", "score": 1.0}]
    with pytest.raises(RunError, match=r"outside the run's 2 layers × 2 heads"):
        load_circuit(_stored_circuit(tmp_path / "a", nodes=nodes, edges=[])[0])
    with pytest.raises(RunError, match="faithfulness curve"):
        load_circuit(_stored_circuit(tmp_path / "b", faithfulness={"sizes": [0, 1, 2], "f": [0.0, 1.0]})[0])
    with pytest.raises(RunError, match="not a head label"):
        load_circuit(_stored_circuit(tmp_path / "c", edges=[{"from": "head 3", "to": "logits", "score": 1.0}])[0])


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--threshold", "0"], "--threshold"),
        (["--threshold", "1.5"], "--threshold"),
        (["--examples", "0"], "--examples"),
        (["--cut", "elbow"], "--cut"),
        (["--direction", "sideways"], "--direction"),
        (["--refine-step", "0"], "--refine-step"),
    ],
)
def test_cli_circuit_refuses_out_of_range_values(extra, option, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the CLI loaded a model before checking its arguments")

    monkeypatch.setattr("attnlab.models.load_model", no_model)
    assert exit_code(["circuit", "--task", "ioi", *extra, "--out", str(tmp_path / "run")]) == 2
    assert option in capsys.readouterr().err and not (tmp_path / "run").exists()
