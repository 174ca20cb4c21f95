"""bench/speculative.py: its prompts, pure figures, targets and option errors on synthetic values; real --quick runs
on a tiny random model (every mode, a layer draft made by realm.draft_file, rows, plot, --plot-only); and the
exactness check catching a speculative output that differs from plain's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from bench_scripts import load_bench_script
from tiny_gguf import TINY, StubTokenizer, write_tiny_llama

from realm.runtime import Backend, Model, load_weights

CONTEXT = 256
DATE, LATER = "2025-01-01T00:00:00+00:00", "2025-02-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("speculative")


@pytest.fixture(scope="module")
def texts():
    return load_bench_script("speculative_texts")


# ---- prompts -----------------------------------------------------------------------------------------------------

def test_prompts(texts):
    grounded, chat = texts.grounded_prompts(), texts.chat_prompts()
    assert len(grounded) == 3 * len(texts.PASSAGES) == 12 and len(chat) == 12
    assert [t.kind for t in grounded[:3]] == ["summary", "quote", "edit"]
    for t in grounded:
        passage = texts.PASSAGES[t.name.split()[0]]
        assert (passage in t.text) == (t.kind != "edit")  # the edit prompt carries the misspelt passage
    assert {t.kind for t in chat} == {"chat"} and len({t.text for t in chat}) == 12
    assert all(text.isascii() for text in texts.PASSAGES.values())


def test_misspell_drops_one_letter_of_every_sixth_long_word(texts):
    text = "alpha bravo charlie delta echo foxtrot golfs hotel india juliet kilos limas mikes novembers oscar"
    got = texts.misspell(text, every=3)
    # words of five letters or more: alpha bravo charlie delta foxtrot golfs ... (echo is not one): every third loses
    # its second-to-last letter
    assert got == "alpha bravo charle delta echo foxtrot gols hotel india julit kilos limas miks novembers oscar"
    misspelt = texts.misspell(texts.GETTYSBURG)
    assert misspelt == texts.misspell(texts.GETTYSBURG)  # deterministic
    assert misspelt.count("\n") == texts.GETTYSBURG.count("\n") and len(misspelt.split(" ")) == len(
        texts.GETTYSBURG.split(" "))
    changed = [(a, b) for a, b in zip(texts.GETTYSBURG.split(), misspelt.split(), strict=True) if a != b]
    assert len(changed) >= 15 and all(len(b) == len(a) - 1 for a, b in changed)


# ---- pure pieces -------------------------------------------------------------------------------------------------

def test_modes(bench):
    assert bench.mode_of("plain").speculative(4) is None
    ngram = bench.mode_of("ngram").speculative(3)
    assert ngram.method.value == "ngram" and ngram.adaptive and ngram.num_speculative_tokens == 3
    fixed = bench.mode_of("draft-fixed").speculative(4)
    assert fixed.method.value == "draft" and not fixed.adaptive
    with pytest.raises(ValueError, match="unknown mode 'medusa'"):
        bench.mode_of("medusa")


def test_repeats_rotate_the_order_of_modes(bench):
    modes = ["plain", "ngram", "draft"]
    orders = [bench.rotated(modes, r) for r in range(4)]
    assert orders == [modes, ["ngram", "draft", "plain"], ["draft", "plain", "ngram"], modes]
    assert [o[0] for o in orders[:3]] == modes  # each mode runs first once in 3 repeats


def test_requests_and_kv_blocks(bench):
    pool = [bench.Prompt(f"p{i}", "edit", tuple(range(10 + i))) for i in range(3)]
    assert bench.requests_for(pool, 1) == pool  # N=1: every prompt, one after another
    assert [p.name for p in bench.requests_for(pool, 8)] == ["p0", "p1", "p2"] * 2 + ["p0", "p1"]
    # the longest prompt (12) + 20 tokens + 4 proposals + 1 = 37 tokens: 3 blocks of 16, plus the free one
    assert bench.kv_blocks({"w": pool}, 8, 20, 4) == 8 * 4


def a_run(bench, wall, tokens, request_s=None, **counts):
    fields = {"steps": 10, "proposed": 8, "accepted": 6, "verifications": 4, "draft_steps": 0, "propose_s": 0.01}
    return bench.Run(wall, tokens, ["length"] * (len(tokens) - 1) + ["stop"], request_s=request_s,
                     **{**fields, **counts})


def test_build_row_and_kinds(bench):
    runs = [a_run(bench, w, [[1] * 30, [2] * 10], request_s=[w * 0.75, w * 0.25]) for w in (2.0, 1.0, 4.0)]
    row = bench.build_row(runs, {"mode": "ngram"}, ["edit", "summary"])
    assert row["output_tokens"] == 40 and row["wall_s"] == 2.0 and row["output_tok_s"] == pytest.approx(20.0)
    assert row["output_tok_s_p20"] == pytest.approx(14.0) and row["output_tok_s_p80"] == pytest.approx(32.0)
    assert row["acceptance_rate"] == pytest.approx(0.75) and row["mean_accepted_length"] == pytest.approx(1.5)
    assert row["tokens_per_step"] == pytest.approx(4.0) and row["stopped"] == 1 and row["repeats"] == 3
    assert row["kind_tok_s"] == {"edit": pytest.approx(20.0), "summary": pytest.approx(20.0)}
    plain = bench.build_row([a_run(bench, 1.0, [[1]], proposed=0, accepted=0, verifications=0)], {})
    assert plain["acceptance_rate"] is None and plain["mean_accepted_length"] is None and plain["kind_tok_s"] is None
    with pytest.raises(ValueError, match="at least one run"):
        bench.build_row([], {})


def test_batch1_modes_take_turns_prompt_by_prompt(bench):
    """At N=1 every prompt runs in every mode before the next prompt (the order rotating by prompt and repeat); a
    mode's run is its prompts' runs merged. At N > 1 each mode runs the whole batch in turn."""
    calls = []

    class Runner:
        def __init__(self, name):
            self.mode = bench.mode_of(name)

        def run(self, requests, n, max_tokens):
            calls.append((self.mode.name, [p.name for p in requests], n))
            wall = 1.0 if self.mode.name == "plain" else 0.5
            return a_run(bench, wall, [[7, 8]] * len(requests), steps=2 * len(requests), proposed=len(requests),
                         request_s=[wall] if n == 1 else None, decode_tokens=len(requests), decode_s=wall / 2)

    runners = [Runner("plain"), Runner("ngram")]
    prompts = [bench.Prompt(f"p{i}", "edit", (1, 2, 3)) for i in range(3)]
    out = bench.repeat_runs(runners, prompts, 1, 8, r=0)
    assert calls == [("plain", ["p0"], 1), ("ngram", ["p0"], 1), ("ngram", ["p1"], 1), ("plain", ["p1"], 1),
                     ("plain", ["p2"], 1), ("ngram", ["p2"], 1)]
    assert [runner.mode.name for runner, _ in out] == ["plain", "ngram"]
    plain = out[0][1]
    assert plain.wall_s == 3.0 and plain.request_s == [1.0, 1.0, 1.0] and plain.steps == 6 and plain.proposed == 3
    assert plain.token_ids == [[7, 8]] * 3 and plain.decode_tokens == 3 and plain.decode_s == 1.5
    calls.clear()
    bench.repeat_runs(runners, prompts, 1, 8, r=1)
    assert [c[0] for c in calls[:2]] == ["ngram", "plain"]  # repeat 1 starts one mode later
    calls.clear()
    out = bench.repeat_runs(runners, prompts, 3, 8, r=1)
    assert calls == [("ngram", ["p0", "p1", "p2"], 3), ("plain", ["p0", "p1", "p2"], 3)]
    with pytest.raises(ValueError, match="at least one run"):
        bench.merged([])


def test_lookup_steps_counts_verifications_of_full_matches(bench):
    prompt = [1, 2, 3, 4, 5, 6]
    # 3 comes from the prefill; its 1-gram occurred at index 2, proposing 4 5 6 (all right), then 9 is drawn
    assert bench.lookup_steps(prompt, [3, 4, 5, 6, 9]) == 2
    assert bench.lookup_steps(prompt, [7, 8, 9]) == 3  # nothing to look up: one token per step
    assert bench.lookup_steps(prompt, []) == 0
    assert bench.lookup_steps(prompt, [3, 4, 5, 6, 9], k=1) == 3  # 3 | 4 5 | 6 9 (k caps each run)


def test_lookup_steps_compares_the_latest_occurrence_rule(bench):
    # after 1: its latest occurrence proposes 6 (wrong), its most frequent next token 5 (right: 5 1 7 in one step)
    prompt = [1, 5, 1, 5, 1, 6]
    assert bench.latest_match([*prompt, 1], 3, 1, 4) == ([6, 1], 1)
    assert bench.lookup_steps(prompt, [1, 5, 1, 7]) == 2
    assert bench.lookup_steps(prompt, [1, 5, 1, 7], lookup=bench.LatestLookup) == 3  # 1 | 5 | 1 7


def test_lookup_steps_with_and_without_lockstep(bench):
    # the output copies the prompt with 4 changed to 9: after 9 (no n-gram), lockstep proposes 5 6 7 8 at once
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    output = [1, 2, 3, 9, 5, 6, 7, 8, 0]
    assert bench.lookup_steps(prompt, output) == 3  # 1 | 2 3 9 | 5 6 7 8 0
    assert bench.lookup_steps(prompt, output, lookup=lambda: bench.engine_lookup(False)) == 4  # ... | 9 5 | 6 7 8 0


def test_lookup_ceiling_scales_the_decode_time_by_steps(bench):
    requests = [bench.Prompt("a", "edit", (1, 2, 3, 4, 5, 6))]
    plain = a_run(bench, 10.0, [[3, 4, 5, 6, 9]], decode_tokens=4, decode_s=8.0)
    c = bench.lookup_ceiling(plain, requests)
    # 1 decode step instead of 4: 2 s of prefill + 8 s * 1/4
    assert c == {"lookup_steps": 2, "lookup_tokens_per_step": 4.0, "lookup_bound_speedup": pytest.approx(10 / 4),
                 "lookup_steps_ngrams_only": 2, "lookup_steps_latest": 2}
    assert bench.lookup_ceiling(a_run(bench, 1.0, [[3]]), requests) == {}


def test_mismatches_name_the_request_and_position(bench):
    assert bench.mismatches([[1, 2, 3], [4]], [[1, 2, 3], [4]], ["a", "b"]) == []
    lines = bench.mismatches([[1, 2, 3, 5], [4]], [[1, 2, 9, 5], [4, 7]], ["a", "b"])
    assert lines == ["a: token 2 of 4 (plain) / 4: plain [3, 5] vs [9, 5]",
                     "b: token 1 of 1 (plain) / 2: plain [] vs [7]"]
    with pytest.raises(ValueError, match="2 reference outputs, 1 outputs"):
        bench.mismatches([[1], [2]], [[1]], ["a", "b"])


def row(mode="ngram", workload="grounded", n=1, speedup=2.0, adaptive=True, date=DATE, device="cpu x", **extra):
    """A row as main() writes it (environment fields included)."""
    tok_s = 10.0 * speedup
    return {"mode": mode, "method": mode.split("-")[0] if mode != "plain" else "none", "adaptive": adaptive,
            "k": 4, "workload": workload, "concurrency": n, "speedup": speedup, "output_tok_s": tok_s,
            "output_tok_s_p20": tok_s, "output_tok_s_p80": tok_s, "acceptance_rate": None if mode == "plain" else 0.5,
            "mean_accepted_length": 1.0, "requests": n, "output_tokens": 96 * n, "wall_s": 1.0, "proposed": 10,
            "accepted": 5, "steps": 50, "tokens_per_step": 2.0, "draft_steps": 0, "outputs_match": 1.0,
            "device": device, "device_kind": "cpu", "backend": "torch", "dtype": "float32", "model": "m.gguf",
            "quick": False, "date": date, "git_commit": "abc", "torch": "t", "threads": 2, "k_max": 4,
            "max_tokens": 96, "draft_layers": "0-3", "draft_model": "d.gguf", **extra}


def test_targets(bench):
    rows = [row("plain", speedup=1.0, adaptive=False), row("ngram", speedup=1.9), row("draft", speedup=0.97),
            row("ngram-fixed", speedup=2.5, adaptive=False), row("ngram", n=32, speedup=0.96),
            row("ngram-fixed", n=32, speedup=0.5, adaptive=False), row("ngram", workload="chat", speedup=1.0)]
    results = {r["target"]: r for r in bench.evaluate_targets(rows)}
    assert results["batch1"]["status"] == "PASS" and results["batch1"]["rows"] == 1  # the best adaptive: ngram 1.9
    assert results["floor"]["status"] == "PASS" and results["floor"]["rows"] == 4  # fixed modes are not judged
    rows += [row("draft", n=8, speedup=0.9), row("ngram", speedup=1.5, date=LATER), row("draft", speedup=1.2,
                                                                                       date=LATER)]
    lines = bench.target_lines(rows)
    assert lines[0].startswith("MISS (batch1)") and "1 of 2 rows below 1.8x; lowest ngram grounded N=1" in lines[0]
    assert lines[1].startswith("MISS (floor)") and "lowest draft grounded N=8 on cpu x: 0.900x" in lines[1]
    assert not any("best_at_batch1" in r for r in rows)  # evaluating does not mark the caller's rows


def test_plot_only_writes_the_png_table_and_targets(bench, tmp_path, capsys):
    rows = []
    for n, ngram, draft in ((1, 1.9, 0.97), (8, 1.3, 0.99), (32, 1.0, 0.96)):
        for workload in ("grounded", "chat"):
            rows += [row("plain", workload, n, 1.0, adaptive=False), row("ngram", workload, n, ngram),
                     row("draft", workload, n, draft), row("ngram-fixed", workload, n, ngram - 0.3, adaptive=False)]
    rows.append(row("ngram", n=1, speedup=0.1, date="2024-01-01T00:00:00+00:00"))  # older: not the latest
    rows.append(row("ngram", n=4, speedup=0.1, quick=True))  # a --quick run: not shown beside a full one
    # an earlier run on another backend: its rows stay in the file, out of the plot and the targets
    rows += [row("ngram", workload, 8, 0.5, date="2024-06-01T00:00:00+00:00", backend="onednn")
             for workload in ("grounded", "chat")]
    path = tmp_path / "speculative.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.main(["--plot-only", "--out", str(path)]) == 0
    assert (tmp_path / "speculative.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "PASS (batch1)" in out and "PASS (floor)" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workload "))
    assert "speedup" in lines[header] and "acceptance_rate" in lines[header]
    body = lines[header + 2 : lines.index("", header)]
    assert len(body) == 24 and {line.split()[1] for line in body} == {"1", "8", "32"}  # not the --quick row's N=4


def test_bad_options_are_errors(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in ((["--device", "cuda"], "no CUDA device"), (["--backend", "triton"], "needs --device cuda"),
                          (["--modes", "plain,medusa"], "modes must be a comma list"),
                          (["--workloads", "code"], "workloads must be a comma list"),
                          (["--concurrency", "0"], "must be an integer >= 1"), (["--k", "16"], "--k must be <= 15"),
                          (["--draft-layers", "3-1"], "--draft-layers: layer range 3-1 runs backwards"),
                          (["--draft", "d.gguf", "--modes", "ngram"], "--modes has none (plain,ngram)"),
                          (["--plot-only", "--out", str(tmp_path / "none.jsonl")], "does not exist")):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# ---- real runs on a tiny random model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.gguf"
    write_tiny_llama(path, context_length=CONTEXT)
    return path


def tiny_prompts(model, workload):
    """Token-id prompts that repeat themselves (what prompt lookup finds), two kinds per workload."""
    g = torch.Generator().manual_seed(len(workload))
    out = []
    for i in range(3):
        part = torch.randint(0, TINY["vocab"], (12 + i,), generator=g).tolist()
        kind = ("edit", "summary")[i % 2] if workload == "grounded" else "chat"
        out.append(load_bench_script("speculative").Prompt(f"{workload} {i}", kind, tuple(part * 3)))
    return out


@pytest.fixture
def quick(bench, tiny, monkeypatch, tmp_path):
    """Runs main on the tiny model; returns (exit status, rows)."""
    monkeypatch.setattr(bench, "load_model", lambda p, device, backend: Model(
        load_weights(p), StubTokenizer(TINY["vocab"]), Backend(backend), device, torch.float32))
    monkeypatch.setattr(bench, "workload_prompts", tiny_prompts)
    out = tmp_path / "speculative.jsonl"

    def run(*extra):
        threads = torch.get_num_threads()
        status = bench.main(["--quick", "--model", str(tiny), "--draft-layers", "1", "--threads", "1", "--out",
                             str(out), *extra])
        assert torch.get_num_threads() == threads  # --threads is not left behind
        return status, bench.read_jsonl(out)

    return run


def test_quick_run_writes_rows_and_a_plot(bench, quick, tmp_path, capsys):
    status, rows = quick("--modes", ",".join(bench.MODES), "--max-tokens", "24")
    assert status == 0
    assert [(r["workload"], r["concurrency"], r["mode"]) for r in rows] == [
        (w, n, m) for w in bench.WORKLOADS for n in (1, 4) for m in bench.MODES]
    for r in rows:
        assert r["outputs_match"] == 1.0  # greedy speculation: plain's tokens exactly
        assert r["requests"] == (2 if r["concurrency"] == 1 else 4) and 0 < r["output_tokens"] <= 24 * r["requests"]
        assert r["output_tok_s"] > 0 and r["output_tok_s_p20"] <= r["output_tok_s"] <= r["output_tok_s_p80"]
        assert r["steps"] > 0 and r["quick"] is True and r["max_tokens"] == 24 and r["k_max"] == 15
        assert r["model"] == "tiny.gguf" and r["draft_layers"] == "1" and r["draft_n_layers"] == 1
        assert r["device_kind"] == "cpu" and r["backend"] == "onednn" and r["threads"] == 1 and r["git_commit"]
        assert (r["kind_tok_s"] is not None) == (r["concurrency"] == 1)
        assert len(r["speedup_runs"]) == r["repeats"] and r["speedup"] == pytest.approx(r["speedup_runs"][0])
        if r["mode"] == "plain":
            assert r["speedup"] == 1.0 and r["proposed"] == 0 and r["acceptance_rate"] is None
            if r["concurrency"] == 1:  # prompt lookup's ceiling on the plain outputs
                assert r["lookup_tokens_per_step"] >= 1 and r["lookup_bound_speedup"] >= 1
        else:
            assert r["speedup"] > 0 and r["k"] == 15 and r["adaptive"] == (not r["mode"].endswith("fixed"))
        if r["mode"].endswith("fixed"):  # always k proposals: the repeated prompts give n-grams from the start
            assert r["proposed"] > 0 and 0 <= r["acceptance_rate"] <= 1 and r["verifications"] > 0
            assert r["accepted"] == pytest.approx(r["mean_accepted_length"] * r["verifications"])
        if r["method"] == "draft" and r["proposed"]:
            assert r["draft_steps"] > 0
        if r["concurrency"] == 1 and r["mode"] != "plain":
            assert set(r["kind_speedup"]) == ({"edit", "summary"} if r["workload"] == "grounded" else {"chat"})
    by = {(r["workload"], r["concurrency"], r["mode"]): r for r in rows}
    assert by[("grounded", 1, "ngram-fixed")]["accepted"] > 0  # the tiny model repeats itself too
    assert (tmp_path / "speculative.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "(batch1)" in out and "(floor)" in out and "draft: 1 of 2 layers (1)" in out
    assert "at N=1, speedup by kind of prompt" in out and "grounded ngram-fixed  edit " in out


def test_a_differing_output_fails_loudly(bench, quick, monkeypatch, capsys):
    run = bench.ModeRunner.run

    def corrupt(self, requests, concurrency, max_tokens):
        out = run(self, requests, concurrency, max_tokens)
        if self.mode.name == "ngram" and concurrency > 1:
            out.token_ids[1] = [*out.token_ids[1][:-1], (out.token_ids[1][-1] + 1) % TINY["vocab"]]
        return out

    monkeypatch.setattr(bench.ModeRunner, "run", corrupt)
    status, rows = quick("--modes", "ngram", "--max-tokens", "6", "--workloads", "chat")
    assert status == 1
    matches = {(r["concurrency"], r["mode"]): r["outputs_match"] for r in rows}
    assert matches == {(1, "plain"): 1.0, (1, "ngram"): 1.0, (4, "plain"): 1.0, (4, "ngram"): 0.75}
    err = capsys.readouterr().err
    assert "FAILED: speculative output differs from plain output in 1 requests" in err
    assert "ngram: chat N=4 request 1 (chat 1): token 5 of 6" in err
    assert not math.isnan(rows[0]["output_tok_s"])
