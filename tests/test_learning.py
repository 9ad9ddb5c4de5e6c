"""Learning, in the suite: the whole pipeline at a fixed seed and fixed step counts (tokenizer once,
tokens once, then stage 2 for each backbone, generate, oracle) must draw what the prompts ask for,
far more often than a model that ignores the words could.

It runs `maskvid demo --recipe learn` (launch/demo_pipeline.py LEARN, configs/demo/learn_*.yaml),
the command a user runs, first with --backbone mebt and then --backbone maskgit in the same
directory: the second run reuses the data, tokenizer and tokens and trains its own stage 2.

The threshold. The 32 prompts (synthetic.balanced_combos) name every colour 4 times and every
direction 8 times, and each of the two videos per prompt is a separate sample. A model that
ignores the colour word draws colours independently of the prompt, so each video matches its
prompt's colour with probability sum_c q(c) * 1/8 = 1/8 whatever its colour distribution q: its
number of hits is Binomial(n, 1/8) if it draws i.i.d., and by Hoeffding (1956) a sum of
independent Bernoullis with that mean has no heavier upper tail beyond mean + 1. The chance level
p of an attribute is read from the prompts themselves (the share of its most frequent value, which
also covers unbalanced prompt sets), and an attribute passes when its accuracy reaches the
smallest k/n with P(Binomial(n, p) >= k) < MAX_FALSE_PASS: a prompt-blind model passes one
attribute with probability below 1e-3. With n = 64 that is 18/64 for colour (chance 1/8) and
28/64 for direction (chance 1/4).

Colour and direction are the attributes asserted: the tokenizer's reconstructions carry them at
this size (the check step records that ceiling), and shape, which needs sharp corners at 32x32,
is not learned at this budget. Run it with
    python -m pytest tests/test_learning.py -q -m slow
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from maskvid.configs import CONFIG_DIR
from maskvid.launch.demo_pipeline import config_max_steps
from tests.conftest import run_cli

MAX_FALSE_PASS = 1e-3  # the chance that a prompt-blind model passes one attribute
ASSERTED = ("colour", "direction")
BACKBONES = ("mebt", "maskgit")


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) >= k)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def pass_threshold(n: int, chance: float, alpha: float = MAX_FALSE_PASS) -> float:
    """The smallest accuracy k/n that a model at `chance` reaches with probability below alpha."""
    return next(k for k in range(n + 1) if binomial_tail(n, chance, k) < alpha) / n


def chance_from_prompts(prompts: list[str]) -> dict[str, float]:
    """Per attribute, the share of the most frequent value among the prompts: what the best
    prompt-blind answer scores in expectation."""
    from maskvid.datamodules.synthetic import parse_caption

    attrs = [parse_caption(p) for p in prompts]
    return {name: max(Counter(a[name] for a in attrs).values()) / len(attrs) for name in ("colour", "shape", "direction")}


# -- the statistics and the prompt set (fast) ----------------------------------------------------------

def test_pass_threshold_is_the_binomial_bound():
    # Known values: 18 of 64 at chance 1/8, 28 of 64 at chance 1/4.
    assert pass_threshold(64, 1 / 8) == 18 / 64
    assert pass_threshold(64, 1 / 4) == 28 / 64
    for n, p in ((64, 1 / 8), (64, 1 / 4), (32, 11 / 32)):
        k = round(pass_threshold(n, p) * n)
        assert binomial_tail(n, p, k) < MAX_FALSE_PASS <= binomial_tail(n, p, k - 1)
    assert binomial_tail(10, 0.5, 0) == pytest.approx(1.0)
    assert binomial_tail(3, 0.5, 3) == pytest.approx(0.125)


def test_balanced_prompts_ask_for_every_colour_and_direction_equally_often():
    from maskvid.datamodules.synthetic import (COLOURS, DIRECTIONS, HELDOUT_COMBOS, attribute_chance,
                                               balanced_combos, caption_for)

    combos = balanced_combos()
    assert len(combos) == len(COLOURS) * len(DIRECTIONS)
    assert {(c, d) for c, _, d in combos} == {(c, d) for c in COLOURS for d in DIRECTIONS}
    assert not set(combos) & set(HELDOUT_COMBOS)  # the prompts are seen combinations
    assert max(Counter(s for _, s, _ in combos).values()) - min(Counter(s for _, s, _ in combos).values()) <= 1
    chance = attribute_chance(combos)
    assert chance == {"colour": 1 / 8, "shape": 11 / 32, "direction": 1 / 4}
    prompts = [caption_for(dict(zip(("colour", "shape", "direction"), c))) for c in combos]
    assert chance_from_prompts(prompts) == chance
    # Unbalanced sets get the share of their most frequent value.
    assert attribute_chance(combos[:4])["colour"] == 1.0


def test_a_rerun_with_another_backbone_redoes_only_the_stage2_steps(tmp_path):
    from maskvid.launch.demo_pipeline import BACKBONE_STEPS, LEARN, DemoPipeline

    out = tmp_path / "run"
    first = DemoPipeline(out, LEARN, 1.0, backbone="mebt", echo=lambda _: None)
    first.steps_dir.mkdir(parents=True)
    calls = []
    for name, _, _ in first.steps():
        (first.steps_dir / f"{name}.json").write_text(json.dumps(
            {"name": name, "seconds": 1.0, "backbone": "mebt" if name in BACKBONE_STEPS else None}))
    again = DemoPipeline(out, LEARN, 1.0, backbone="mebt", echo=lambda _: None)
    assert all(again.done(name) for name, _, _ in again.steps())
    other = DemoPipeline(out, LEARN, 1.0, backbone="maskgit", echo=lambda _: None)
    assert [name for name, _, _ in other.steps() if not other.done(name)] == list(BACKBONE_STEPS)
    assert set(other.records()) == {"data", "check", "tokenizer", "tokenize"}
    # run() executes exactly those, in order.
    other.steps = lambda: [(n, n, lambda n=n: calls.append(n) or {}) for n in
                           ("data", "check", "tokenizer", "tokenize", *BACKBONE_STEPS)]
    other.write_summary = lambda: {}
    other.run()
    assert calls == list(BACKBONE_STEPS)
    assert json.loads((out / "steps/stage2.json").read_text())["backbone"] == "maskgit"


# -- the learning run (slow) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Both backbones' summary.json, from one directory: mebt first, then maskgit on the same
    tokens."""
    out = tmp_path_factory.mktemp("learning") / "run"
    summaries = {}
    for backbone in BACKBONES:
        # One intra-op thread: the figures then do not depend on the machine's core count, and a
        # shared CI machine does not stall the fits' thread barriers.
        run = run_cli("demo", "--out", str(out), "--recipe", "learn", "--backbone", backbone, "--quiet",
                      env={"OMP_NUM_THREADS": "1"}, timeout=2400)
        assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
        summaries[backbone] = json.loads((out / "summary.json").read_text())
    return {b: (out, s) for b, s in summaries.items()}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_generated_videos_show_the_prompted_colour_and_direction(learned, backbone):
    from maskvid.launch.demo_checks import oracle_accuracy

    out, summary = learned[backbone]
    assert summary["backbone"] == backbone and summary["budget_minutes"] is None
    accuracy = summary["metrics"]["caption_accuracy"]["balanced"]
    index = out / "generated/balanced/index.json"
    if backbone == BACKBONES[-1]:  # the last run's videos are the ones on disk: read them again
        assert oracle_accuracy(index) == accuracy
    prompts = [item["prompt"] for item in json.loads(index.read_text())]
    n = accuracy["n"]
    assert n == len(prompts) == 64
    chance = chance_from_prompts(prompts)
    assert {k: summary["metrics"]["caption_chance"]["balanced"][k] for k in chance} == {
        k: round(v, 4) for k, v in chance.items()}
    figures = {a: (accuracy[a], chance[a], pass_threshold(n, chance[a])) for a in ("colour", "shape", "direction")}
    print(f"{backbone}: (accuracy, chance, threshold) per attribute {figures}")
    for attribute in ASSERTED:
        got, at_chance, threshold = figures[attribute]
        assert got >= threshold, f"{backbone} {attribute}: {got:.3f} < {threshold:.3f} (chance {at_chance:.3f}); {figures}"


@pytest.mark.slow
def test_the_second_backbone_reused_the_tokenizer_and_trained_its_own_stage2(learned):
    import torch

    (out, mebt), (_, maskgit) = learned["mebt"], learned["maskgit"]
    # The tokenizer and tokens were made once: the same step records in both summaries.
    for step in ("data", "tokenizer", "tokenize"):
        assert mebt["seconds"][step] == maskgit["seconds"][step]
        assert mebt["commands"][step] == maskgit["commands"][step]
    # Each fit ran exactly its config's steps (no time budget), and stage 2 with its own backbone.
    for backbone, summary in (("mebt", mebt), ("maskgit", maskgit)):
        ckpt = torch.load(summary["checkpoints"]["stage2"], map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == config_max_steps(CONFIG_DIR / f"demo/learn_{backbone}.yaml")
        assert f"maskvid.models.{backbone}." in json.dumps(ckpt["hyper_parameters"], default=str)
    tokenizer = torch.load(mebt["checkpoints"]["tokenizer"], map_location="cpu", weights_only=False)
    assert tokenizer["global_step"] == config_max_steps(CONFIG_DIR / "demo/learn_tokenizer.yaml")
