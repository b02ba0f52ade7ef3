"""RolloutSource: prompts → n samples → rewards → groups; the per-sample fields, the JSONL, and exact resume."""

import json

import pytest

from rollouts.engine import SamplingParams
from rollouts.hf_engine import HFEngine
from rollouts.rewards import load_reward
from rollouts.rollout_source import PromptItem, RolloutSource
from rollouts.scoring import RewardTerm, Scorer


def digit_share(prompts, completions, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def make_source(model, tokenizer, path=None, n=3, batch_size=2, seed=0):
    prompts = [PromptItem(prompt_ids=tokenizer(t)["input_ids"], prompt_text=t, fields={"answer": a}, index=i)
               for i, (t, a) in enumerate([("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6"), ("4+4=", "8"), ("5+5=", "10")])]
    scorer = Scorer([RewardTerm("digits", digit_share, 1.0),
                     RewardTerm("exact_match", load_reward("exact_match"), 0.5)])
    return RolloutSource(prompts, HFEngine(model, tokenizer), scorer, SamplingParams(max_new_tokens=6), n=n,
                         batch_size=batch_size, seed=seed, samples_path=path)


def test_groups_fields_and_jsonl(tiny_model, tokenizer, tmp_path):
    path = str(tmp_path / "samples" / "rollouts.jsonl")
    src = make_source(tiny_model, tokenizer, path)
    batch = src.next_batch()
    assert len(batch) == 2 * 3
    groups = [ex.group for ex in batch]
    assert groups == [groups[0]] * 3 + [groups[3]] * 3 and groups[0] != groups[3]
    for ex in batch:
        (s,) = ex.samples
        P = len(src.prompts.examples[ex.index].prompt_ids)
        assert s.loss_mask == [False] * P + [True] * (len(s.input_ids) - P)
        assert len(s.fields["engine_logprobs"]) == len(s.input_ids)
        assert s.fields["engine_logprobs"][:P] == [0.0] * P and all(x < 0 for x in s.fields["engine_logprobs"][P:])
        assert s.fields["weight_version"] == 0.0
    recs = [json.loads(line) for line in open(path)]
    assert len(recs) == 6
    for rec, ex in zip(recs, batch):
        want = rec["rewards"]["digits"] + 0.5 * rec["rewards"]["exact_match"]
        assert rec["reward"] == pytest.approx(want) == ex.samples[0].fields["reward"]
        assert {"batch", "prompt", "completion", "answer", "weight_version", "finish_reason", "tokens"} <= set(rec)
    m = src.last_metrics
    assert m["reward_mean"] == pytest.approx(sum(r["reward"] for r in recs) / 6)
    assert {"reward_std", "reward/digits", "reward/exact_match", "completion_length", "rollout_time"} <= set(m)
    # the next batch continues the prompt order; the groups stay unique
    nxt = src.next_batch()
    assert not {ex.group for ex in nxt} & set(groups)


def test_resume_continues_exactly_and_trims_the_jsonl(tiny_model, tokenizer, tmp_path):
    straight = make_source(tiny_model, tokenizer)
    want = [[s.input_ids for ex in straight.next_batch() for s in ex.samples] for _ in range(4)]

    path = str(tmp_path / "r.jsonl")
    first = make_source(tiny_model, tokenizer, path)
    first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives the checkpoint's JSON
    first.next_batch()  # a batch the crashed run made after its checkpoint
    resumed = make_source(tiny_model, tokenizer, path)
    resumed.load_state_dict(state)
    assert {json.loads(l)["batch"] for l in open(path)} == {0}  # records after the checkpoint are dropped
    got = [[s.input_ids for ex in resumed.next_batch() for s in ex.samples] for _ in range(3)]
    assert got == want[1:]  # same prompts (across the epoch boundary) and the same samples
