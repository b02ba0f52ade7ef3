"""Generation with transformers ``generate``: any machine, any model, the same interface as the vLLM engine.

By default the engine samples from the training model itself (no copy, always in sync); ``load_weights`` then only
stamps the weight version without reading the stream. Give it a separate model (``shares_weights=False``) to sample
from a copy; pushes then copy the streamed tensors in place, one at a time.

Seeded sampling is reproducible: the same seed, prompts, ``n``, batch size and weights give the same completions
(the global RNG is forked, seeded, and restored, so the caller's random state is untouched).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .engine import Completion, SamplingParams


class HFEngine:
    copies_weights = False  # set per instance from shares_weights

    def __init__(self, model, tokenizer, batch_size: int = 64, shares_weights: bool = True, progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.shares_weights = shares_weights
        self.copies_weights = not shares_weights
        self.progress = progress
        self.weight_version = 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[Completion]:
        if not prompts:
            return []
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        eos_ids = self._eos_ids()
        greedy = sampling.temperature <= 0
        out: list[Completion] = []
        # seeded: sample from a forked, seeded RNG (the caller's random state is restored afterwards); unseeded: the
        # global RNG, which advances, so two unseeded calls differ
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                    enabled=sampling.seed is not None)
        try:
            with rng:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                # longest prompts first so each generate() call pads little
                order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
                batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
                results: dict[int, list[Completion]] = {}
                iterator = batches
                if self.progress:
                    from tqdm.auto import tqdm

                    iterator = tqdm(batches, desc="generate", leave=False)
                for idx in iterator:
                    for i, comps in zip(idx, self._generate_batch([prompts[i] for i in idx], sampling, n, greedy,
                                                                  device, pad_id, eos_ids)):
                        for c in comps:
                            c.prompt_index = i
                        results[i] = comps
                for i in range(len(prompts)):
                    out.extend(results[i])
        finally:
            model.train(was_training)
        return out

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for x in (self.tokenizer.eos_token_id, gen_eos):
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, (list, tuple)):
                ids.update(x)
        return ids

    def _generate_batch(self, prompts, sampling, n, greedy, device, pad_id, eos_ids):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding for generation
            ids[r, width - len(p) :] = torch.tensor(p)
            att[r, width - len(p) :] = 1
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n,
            do_sample=not greedy,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos_ids) or None,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
        )
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        gen = self.model.generate(**kwargs)
        new = gen.sequences[:, width:]  # (len(prompts) * n, L)
        # raw-distribution log-probs of the chosen tokens (logits before temperature / top-p processing), one
        # generation step at a time so no (rows, L, V) tensor is built
        lps = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, new[:, t, None])[:, 0]
                           for t, step in enumerate(gen.logits)], dim=1)  # (rows, L)
        results = []
        for r in range(len(prompts)):
            comps = []
            for j in range(n):
                row = r * n + j
                toks = new[row].tolist()
                cut, reason = len(toks), "length"
                for t, tok in enumerate(toks):
                    if tok in eos_ids:
                        cut, reason = t + 1, "stop"
                        break
                toks = toks[:cut]
                comps.append(Completion(
                    prompt_index=r, prompt_ids=list(prompts[r]), token_ids=toks,
                    logprobs=lps[row, :cut].tolist(),
                    text=self.tokenizer.decode(toks, skip_special_tokens=True),
                    finish_reason=reason, weight_version=self.weight_version,
                ))
            results.append(comps)
        return results

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        if not self.shares_weights:
            own = self.model.state_dict()
            for name, tensor in named_tensors:
                if name not in own:
                    raise ValueError(f"HFEngine.load_weights: {name!r} is not a tensor of the engine's model")
                if own[name].shape != tensor.shape:
                    raise ValueError(f"HFEngine.load_weights: {name!r} has shape {tuple(tensor.shape)}, the engine's "
                                     f"model has {tuple(own[name].shape)}")
                own[name].copy_(tensor)
        self.weight_version = self.weight_version + 1 if version is None else int(version)

    # nothing to free: transformers keeps no KV cache between generate() calls
    def sleep(self) -> None:
        pass

    def wake_weights(self) -> None:
        pass

    def wake(self) -> None:
        pass
