"""The rollout-side steps of Best-of-N distillation (rollouts/selection.py, rollouts/reference_rewards.py,
rollouts/processed_source.py) with a scripted engine, and the config checks around them.

- `best` keeps each prompt's top sample (first of ties); `verified` keeps those at the threshold, deduplicated;
  `best_worst` pairs best/worst as chosen/rejected and skips (counts) prompts whose samples tie.
- Reference counts (b below, e tied) are right; a fixed reference is sampled once per prompt (cache, saved and
  restored with the checkpoint state); a moving one every batch; `add_best` adds the best reference sample, flagged.
- A batch where nothing is kept comes back empty with a placeholder of the right shape; too many in a row stop the
  run with a message; every generated sample is counted.
"""

import pytest
from helpers import tiny_config, write_jsonl

from align.config import pipeline_from_dict
from align.configio import ConfigError
from rollouts.engine import Completion, SamplingParams
from rollouts.processed_source import ProcessedSource, SelectionError
from rollouts.reference_rewards import ReferenceRewards, rank_counts
from rollouts.rollout_source import PromptItem, RolloutSource
from rollouts.scoring import RewardTerm, Scorer
from rollouts.selection import BestOfGroup, BestWorstPairs, Verified, build_selector
from rollouts.types import Example, Sample


def example(group, reward, tokens=(5,), index=None):
    s = Sample(input_ids=[1, 2, *tokens], loss_mask=[False, False] + [True] * len(tokens), fields={"reward": reward})
    return Example(samples=[s], index=group if index is None else index, group=group)


def test_best_keeps_the_top_sample_of_each_prompt_first_of_ties():
    batch = [example(0, 0.2, (1,)), example(0, 0.9, (2,)), example(0, 0.9, (3,)), example(1, 0.0, (4,)),
             example(1, 0.0, (5,))]
    sel = BestOfGroup()
    kept = sel(batch, {}, 0)
    assert [ex.samples[0].input_ids[-1] for ex in kept] == [2, 4]
    assert sel.metrics["select/kept_frac"] == pytest.approx(2 / 5)
    assert sel.metrics["select/kept_reward_mean"] == pytest.approx(0.45)


def test_verified_keeps_every_passing_sample_once():
    batch = [example(0, 1.0, (7,)), example(0, 1.0, (7,)), example(0, 1.0, (8,)), example(0, 0.0, (9,)),
             example(1, 0.0, (7,)), example(1, 0.5, (7,))]
    sel = Verified(threshold=1.0)
    kept = sel(batch, {}, 0)
    assert [(ex.group, ex.samples[0].input_ids[-1]) for ex in kept] == [(0, 7), (0, 8)]
    assert sel.metrics["select/duplicates"] == 1.0 and sel.metrics["select/groups_without_pass"] == 0.5
    assert [ex.group for ex in Verified(threshold=0.5)(batch, {}, 0)] == [0, 0, 1]


def test_best_worst_pairs_chosen_first_and_skips_ties():
    batch = [example(0, 0.5, (1,)), example(0, 1.0, (2,)), example(0, 0.0, (3,)), example(1, 1.0, (4,)),
             example(1, 1.0, (5,)), example(2, 0.0, (6,))]
    sel = BestWorstPairs()
    pairs = sel(batch, {}, 0)
    assert len(pairs) == 1 and [s.input_ids[-1] for s in pairs[0].samples] == [2, 3]
    assert sel.metrics["select/tied_groups"] == 2.0 and sel.metrics["select/tied_frac"] == pytest.approx(2 / 3)
    assert sel.metrics["select/reward_margin"] == 1.0
    assert len(sel.placeholder(batch).samples) == 2  # an empty batch is still collated as a pair
    with pytest.raises(ValueError, match="unknown rollout.select 'top'; choose one of all, best, verified"):
        build_selector("top")


# --------------------------------------------------------------------------------------- reference counts
class ScriptedEngine:
    """Completion k of a prompt is the single token ``base + k`` (so a reward can read it); counts calls."""

    copies_weights = False

    def __init__(self, base=0):
        self.base, self.calls, self.weight_version = base, [], 0

    def generate(self, prompts, sampling, n=1):
        self.calls.append((len(prompts), n, sampling.seed))
        out = []
        for i, p in enumerate(prompts):
            for k in range(n):
                tok = self.base + k
                out.append(Completion(prompt_index=i, prompt_ids=list(p), token_ids=[tok], logprobs=[-1.0],
                                      text=str(tok), finish_reason="stop"))
        return out


def token_reward(prompts, completions, **fields):
    return [float(int(c) % 10) / 10 for c in completions]  # token 3 → 0.3, token 12 → 0.2


def scorer():
    return Scorer([RewardTerm("tok", token_reward)])


def prompts(n):
    return [PromptItem(prompt_ids=[1, 2 + i], prompt_text=f"p{i}", fields={}, index=i) for i in range(n)]


def test_rank_counts_count_ties_explicitly():
    assert rank_counts(0.5, [0.1, 0.5, 0.5, 0.9]) == (1, 2)
    assert rank_counts(0.0, [0.1, 0.5]) == (0, 0) and rank_counts(1.0, [1.0, 1.0]) == (0, 2)


def test_fixed_reference_is_sampled_once_per_prompt_and_cached():
    policy = RolloutSource(prompts(4), ScriptedEngine(base=2), scorer(), SamplingParams(seed=0), n=2, batch_size=2,
                           shuffle=False)
    ref_engine = ScriptedEngine(base=0)  # reference rewards 0.0, 0.1, 0.2, 0.3 for every prompt
    step = ReferenceRewards(ref_engine, scorer(), SamplingParams(seed=0), k=4, cache=True)
    source = ProcessedSource(policy, [step])
    batch = source.next_batch()
    # policy samples: tokens 2, 3 → rewards 0.2 (b = 2, e = 1), 0.3 (b = 3, e = 1)
    assert [(s.fields["ref_below"], s.fields["ref_equal"], s.fields["ref_count"]) for ex in batch
            for s in ex.samples] == [(2.0, 1.0, 4.0), (3.0, 1.0, 4.0)] * 2
    assert ref_engine.calls == [(2, 4, ref_engine.calls[0][2])]
    assert source.last_metrics["reference/samples"] == 8 and source.last_metrics["reference/reward_mean"] == pytest.approx(0.15)
    source.next_batch()
    source.next_batch()  # epoch 2: prompts 0, 1 again, from the cache
    assert len(ref_engine.calls) == 2 and source.last_metrics["reference/samples"] == 0
    assert source.last_metrics["samples/policy"] == 12 and source.last_metrics["samples/reference"] == 16
    assert source.last_metrics["samples/total"] == 28
    state = source.state_dict()
    fresh = ProcessedSource(RolloutSource(prompts(4), ScriptedEngine(2), scorer(), SamplingParams(seed=0), n=2,
                                          batch_size=2, shuffle=False),
                            [ReferenceRewards(ScriptedEngine(0), scorer(), SamplingParams(seed=0), k=4)])
    fresh.load_state_dict(state)
    assert fresh.steps[0].rewards == step.rewards and fresh.counts == source.counts
    fresh.next_batch()
    assert fresh.steps[0].engine.calls == []  # prompts 2, 3 come from the restored cache


def test_moving_reference_samples_every_batch_and_adds_its_best_sample():
    policy = RolloutSource(prompts(2), ScriptedEngine(base=1), scorer(), SamplingParams(seed=0), n=1, batch_size=2,
                           shuffle=False)
    ref_engine = ScriptedEngine(base=0)  # anchor samples: tokens 0, 1 → rewards 0.0, 0.1
    step = ReferenceRewards(ref_engine, scorer(), SamplingParams(seed=0), k=2, cache=False, add_best=True)
    source = ProcessedSource(policy, [step])
    batch = source.next_batch()
    assert len(batch) == 4  # per prompt: the policy sample, then (after all) the best anchor sample
    best = [ex for ex in batch if ex.samples[0].fields.get("reference_sample") == 1.0]
    assert [ex.samples[0].input_ids[-1] for ex in best] == [1, 1] and [ex.group for ex in best] == [0, 1]
    assert best[0].samples[0].fields["ref_equal"] == 1.0 and best[0].samples[0].fields["reward"] == 0.1
    source.next_batch()
    assert len(ref_engine.calls) == 2  # no cache: the anchor moves
    with pytest.raises(ValueError, match="add_best needs fresh reference samples every batch"):
        ReferenceRewards(ref_engine, scorer(), SamplingParams(), k=2, cache=True, add_best=True)


def test_an_empty_selection_returns_an_empty_batch_and_too_many_stop_the_run():
    policy = RolloutSource(prompts(2), ScriptedEngine(base=0), scorer(), SamplingParams(seed=0), n=2, batch_size=2,
                           shuffle=False)
    source = ProcessedSource(policy, [Verified(threshold=0.9)], max_empty=3)  # rewards are 0.0, 0.1: none passes
    assert source.next_batch() == [] and source.next_batch() == []
    assert source.last_metrics["select/empty_batches"] == 2 and len(source.examples) == 1
    with pytest.raises(SelectionError, match="3 rollout batches in a row had no sample the selection kept.*lower "
                                             "rollout.select_threshold"):
        source.next_batch()


# ------------------------------------------------------------------------------------------------ config
def rollout_cfg(tmp_path, loss, **rollout):
    p = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q:", "answer": "1"}])
    return tiny_config(tmp_path, loss=loss, rollout={"prompts": p, **rollout})


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="set rollout.select: best_worst to pair each prompt's best and worst"):
        pipeline_from_dict(rollout_cfg(tmp_path, {"name": "dpo"}))
    with pytest.raises(ConfigError, match="makes preference pairs, but loss 'sft' does not train on pairs"):
        pipeline_from_dict(rollout_cfg(tmp_path, {"name": "sft"}, select="best_worst"))
    with pytest.raises(ConfigError, match="rollout.select: best drops samples, but loss 'bond' needs every sample"):
        pipeline_from_dict(rollout_cfg(tmp_path, {"name": "bond"}, select="best"))
    with pytest.raises(ConfigError, match="rollout.select"):
        pipeline_from_dict(rollout_cfg(tmp_path, {"name": "sft"}, select="top"))
    cfg = rollout_cfg(tmp_path, {"name": "bond"})
    del cfg["rollout"]
    with pytest.raises(ConfigError, match="needs rewards from rollouts: add a `rollout:` section"):
        pipeline_from_dict(cfg)
    with pytest.raises(ConfigError, match=r"loss \(jbond\): reference_ema"):
        pipeline_from_dict(rollout_cfg(tmp_path, {"name": "jbond", "reference_ema": 0}))
    for loss, select in (({"name": "sft"}, "best"), ({"name": "sft"}, "verified"), ({"name": "dpo"}, "best_worst"),
                         ({"name": "bond"}, "all"), ({"name": "vbon"}, "all"), ({"name": "jbond"}, "all")):
        pipeline_from_dict(rollout_cfg(tmp_path, loss, select=select))
