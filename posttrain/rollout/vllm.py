"""``rollout.backend: vllm``: generation by a vLLM server (posttrain/rollout/vllm_server.py), for HF models.

* **Snapshot**: the policy as an HF directory vLLM loads (``config.json``, the tokenizer with its chat template
  and tool tokens, one ``model.safetensors``): LoRA merged, W + (α/r)·B·A per adapted layer; tied weights
  written once. The first weight sync writes it and starts the server on it (``rollout.vllm.python``) or has
  the user's server (``rollout.vllm.url``) load it.
* **Weight sync**: vLLM reads weights from files, so every sync writes the whole merged model again (to a
  temporary name, then renamed: the server never sees half a file) and calls vLLM's in-place
  ``reload_weights`` through ``/collective_rpc`` (dev mode), then resets the prefix cache (cached prompts
  were computed with the old weights). The tensors come from :func:`~posttrain.rollout.base.sync`: the whole
  state first, then the trainable ones (LoRA: the adapter), laid over the first.
* **Generation**: one ``/v1/completions`` request per prompt (all in flight at once, so the server batches
  them), with the prompt's token ids, ``n`` samples from the prompt's group seed, temperature / top-k / top-p,
  ``max_tokens`` and the tokenizer's stop ids, asking for the sampled tokens' processed log-probs (the
  distribution sampled, after truncation: what the local engine returns too). Greedy rows (temperature 0)
  get log-prob 0, as the local engine gives them. vLLM's sampler is not ours, so rows differ from the local
  engine's for the same seeds (greedy rows aside); the same seeds gave the same rows from the same CPU server
  (tested), but vLLM on a GPU is not batch-invariant: there, and so across a resume, rows may differ.
* **Tools**: with tool tokens, generation also stops at ``<|tool_end|>``; the call since the row's last
  ``<|tool_start|>`` runs, its output is appended (mask 0, log-prob 0, within the row's token budget) and the
  row continues in a new request on prompt + completion so far, with a seed drawn from the group seed, the
  row and the round. A ``<|tool_end|>`` with no open call is just a token.
* **Failure**: every request and sync waits at most ``rollout.timeout_s``; an error the server answers, a
  server that died (with the last lines of its log) or one that hangs is a
  :class:`~posttrain.rollout.base.RolloutError`. The server stops with the run.

The built-in GPT cannot be served (vLLM has no ReLU² MLP): ``rollout.backend=vllm`` with it is a ConfigError.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.config_checks import ConfigError
from posttrain.engine import RolloutBatch, SamplingParams
from posttrain.random_streams import group_seed, group_seeds
from posttrain.rollout.base import RolloutConfig, RolloutError
from posttrain.rollout.vllm_server import VllmServer
from posttrain.tools import default_registry

SERVER_DTYPES = {"fp32": "float32", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "fp16-mixed": "float16"}
_SEED_RANGE = 2**63  # vLLM takes a signed 64-bit seed


def lora_layers(model: torch.nn.Module) -> dict[str, tuple[str, float, bool]]:
    """Each peft LoRA layer of ``model`` by module name → (its active adapter, its scale α/r, whether its
    weight is stored transposed: fan_in_fan_out)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "scaling", None), dict):
            adapter = module.active_adapters[0]
            if getattr(module, "use_dora", {}).get(adapter):
                raise ConfigError("rollout.backend=vllm merges plain LoRA adapters; this one uses DoRA")
            out[name] = (adapter, float(module.scaling[adapter]), bool(getattr(module, "fan_in_fan_out", False)))
    return out


def hf_weights(state: dict[str, torch.Tensor], lora: dict[str, tuple[str, float, bool]]) -> dict[str, torch.Tensor]:
    """The HF checkpoint of a policy from its state dict by posttrain's names (``hf.`` + the HF or peft names):
    LoRA merged (W + scale · B·A on each adapted layer's weight, in float32, then cast back), adapter tensors
    dropped, peft's prefixes removed, and a tensor that shares storage with an earlier one (tied embeddings)
    left out, as HF checkpoints do."""
    out, seen = {}, set()
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
            if leaf == "weight" and module in lora:
                adapter, scale, transposed = lora[module]
                a = state[f"{module}.lora_A.{adapter}.weight"].float()  # (r, in)
                b = state[f"{module}.lora_B.{adapter}.weight"].float()  # (out, r)
                delta = (b @ a) * scale  # (out, in)
                tensor = (tensor.float() + (delta.T if transposed else delta)).to(tensor.dtype)
            elif tensor.untyped_storage().data_ptr() in seen:
                continue
        elif tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        key = f"{module}.{leaf}".removeprefix("hf.").removeprefix("base_model.model.")
        out[key] = tensor.detach().cpu().contiguous()
    return out


@dataclass
class _Row:
    """One completion as it grows over requests (tool calls split a row into several)."""

    prompt: list[int]
    seed: int  # the group's seed
    index: int  # the row's place in its group
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    finished: bool = False
    done: bool = False


class VllmBackend:
    remote = True  # under data parallelism rank 0 drives the server (rollout.base.Follower on the others)

    def __init__(self, config: RolloutConfig, model, tokenizer, precision: str = "fp32"):
        from posttrain.models.hf import HFPolicy

        if not isinstance(model, HFPolicy):
            raise ConfigError("rollout.backend=vllm serves HF models (model.path); vLLM cannot run the built-in "
                              "GPT: use rollout.backend=local or ray")
        config.vllm.check()
        self.config, self.tokenizer, self.model = config, tokenizer, model
        self.version: int | None = None
        self.sync_every = config.sync_every
        self.tools = default_registry() if tokenizer.has_tools else None
        self.stop_ids = sorted(tokenizer.stop_ids)
        self.lora = lora_layers(model)
        weights = str(next(model.parameters()).dtype).removeprefix("torch.")  # bf16-true, or an eval's --dtype
        self.dtype = SERVER_DTYPES[precision] if precision in ("bf16-mixed", "fp16-mixed") else weights
        self.state: dict[str, torch.Tensor] = {}
        self.server: VllmServer | None = None
        self.failed = False  # a RolloutError came out of this backend: keep the server's log
        self.root: Path | None = None  # the snapshot's directory, made at the first sync
        self.own_dir = config.vllm.snapshot_dir is None

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    # -- weights -------------------------------------------------------------------------------------------------
    def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Lay ``named_tensors`` over the state synced so far (the first sync: the whole state), write the merged
        model and have the server load it (the first time: start it on it)."""
        try:
            self._update(named_tensors)
        except RolloutError:
            self.failed = True
            raise
        self.version = version

    def _update(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.state.update((name, tensor.detach()) for name, tensor in named_tensors)
        if self.root is None:
            own = self.config.vllm.snapshot_dir
            self.root = Path(tempfile.mkdtemp(prefix="posttrain-vllm-") if own is None else own)
            self.model_dir.mkdir(parents=True, exist_ok=True)
            self.model.hf.config.save_pretrained(self.model_dir)  # this run's, even in a snapshot_dir used before
            self.tokenizer.save_pretrained(self.model_dir)
        self._write(hf_weights(self.state, self.lora))
        if self.server is None:
            self.server = VllmServer(self.config.vllm, self.model_dir, self.dtype, self.config.timeout_s)
            if self.config.vllm.url is not None:  # the user's server has some model: give it ours
                self._reload()
            self._check_processed_logprobs()
        else:
            self._reload()

    def _write(self, weights: dict[str, torch.Tensor]) -> None:
        partial = self.model_dir / "model.safetensors.partial"
        save_file(weights, partial, metadata={"format": "pt"})
        os.replace(partial, self.model_dir / "model.safetensors")

    def _reload(self) -> None:
        """The server's in-place reload of the snapshot (a worker's failure is an HTTP error), then a prefix-cache
        reset, retried while blocks are held: a prompt cached under the old weights must not be reused."""
        self.server.post("/collective_rpc", {"method": "reload_weights",
                                             "kwargs": {"weights_path": str(self.model_dir)}})
        for _ in range(20):
            if (self.server.post("/reset_prefix_cache", {}) or {}).get("success"):
                return
            time.sleep(0.1)
        raise RolloutError("the vLLM server did not reset its prefix cache after a weight reload (blocks held)")

    def _check_processed_logprobs(self) -> None:
        """A one-token request whose top-p keeps a single token: the processed log-prob of that point mass is 0; a
        raw one (a server without --logprobs-mode processed_logprobs) is the model's log-prob of the token, which
        would be taken for the behaviour policy's (it passes only where the model itself is sure: p > 0.9999)."""
        prompt = self.tokenizer.encode("1 + 1 =") or [self.tokenizer.pad_id]
        probe = self._post({"model": self.server.model, "prompt": prompt, "n": 1, "max_tokens": 1, "top_k": -1,
                            "temperature": 1.0, "top_p": 1e-6, "logprobs": 0, "return_token_ids": True, "seed": 0},
                           self.config.timeout_s)[0]["logprobs"]["token_logprobs"][0]
        if abs(probe) > 1e-4:
            raise RolloutError(f"the vLLM server at {self.server.url} returns raw log-probs (a token top-p kept "
                               f"alone got {probe:.3g}, not 0): start it with --logprobs-mode processed_logprobs")

    def _post(self, body: dict, timeout: float) -> list[dict]:
        """The choices of one /v1/completions request, by index."""
        answer = self.server.post("/v1/completions", body, timeout=timeout)
        try:
            return sorted(answer["choices"], key=lambda c: c["index"])
        except (KeyError, TypeError):
            raise RolloutError(f"the vLLM server answered /v1/completions without choices: {str(answer)[:200]}"
                               ) from None

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int | None = None,
                 seeds: list[int] | None = None) -> RolloutBatch:
        """As :meth:`posttrain.engine.Engine.generate` (``seeds``, or ``seed`` for prompt i's
        ``group_seed(seed, i)``), sampled by vLLM (see the module docstring for what differs)."""
        seeds = group_seeds(len(prompts), seed, seeds)
        if self.version is None:
            raise RolloutError("the vLLM server has not received the trainer's weights yet (update_weights)")
        rows = [_Row(prompt, s, j) for prompt, s in zip(prompts, seeds, strict=True) for j in range(n)]
        deadline = time.monotonic() + self.config.timeout_s
        calls = failures = 0
        pool = ThreadPoolExecutor(max_workers=min(64, len(rows)))
        try:
            batches = [(rows[i * n:(i + 1) * n], s) for i, s in enumerate(seeds)]  # round 0: one request a group
            for round_ in range(params.max_new_tokens + 1):
                requests = [pool.submit(self._complete, group, s, params, deadline) for group, s in batches]
                for (group, _), request in zip(batches, requests, strict=True):
                    for row, choice in zip(group, request.result(), strict=True):
                        called, failed = self._extend(row, choice, params)
                        calls, failures = calls + called, failures + failed
                pending = [row for row in rows if not row.done]
                if not pending:
                    break
                batches = [([row], group_seed(row.seed, row.index, round_ + 1)) for row in pending]
        except RolloutError:
            self.failed = True
            raise
        finally:  # on an error or Ctrl-C, requests not sent yet are dropped, not waited for
            pool.shutdown(wait=False, cancel_futures=True)
        return self._batch(rows, len(prompts), n, calls, failures)

    def _room(self, row: _Row, params: SamplingParams) -> int:
        """Tokens ``row`` may still add: its budget, and what is left of the server's context."""
        room = params.max_new_tokens - len(row.tokens)
        if self.server.max_model_len is not None:
            room = min(room, self.server.max_model_len - len(row.prompt) - len(row.tokens))
        return room

    def _complete(self, group: list[_Row], seed: int, params: SamplingParams, deadline: float) -> list[dict]:
        """One request: ``len(group)`` samples continuing ``group[0]``'s prompt and tokens so far, by index."""
        row, greedy = group[0], params.temperature <= 0  # greedy: vLLM samples one, the group's rows are equal
        body = {"model": self.server.model, "prompt": row.prompt + row.tokens, "n": 1 if greedy else len(group),
                "seed": seed % _SEED_RANGE, "max_tokens": max(1, self._room(row, params)),
                "temperature": params.temperature, "top_k": params.top_k or -1, "top_p": params.top_p or 1.0,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
                "stop_token_ids": self.stop_ids + ([self.tokenizer.tool_end_id] if self.tools else [])}
        left = deadline - time.monotonic()
        if left <= 0:
            raise RolloutError(f"the vLLM server did not finish a generation within rollout.timeout_s="
                               f"{self.config.timeout_s:g} s (hung, or give it more time)")
        choices = self._post(body, left)
        if greedy and len(choices) == 1:
            choices = choices * len(group)
        if len(choices) != len(group) or not all(isinstance(c.get("token_ids"), list) and c["token_ids"] and
                                                 isinstance((c.get("logprobs") or {}).get("token_logprobs"), list)
                                                 for c in choices):
            raise RolloutError(f"the vLLM server answered {len(choices)} samples for {len(group)}, or samples "
                               f"without token ids and log-probs: {str(choices)[:200]}")
        return choices

    def _extend(self, row: _Row, choice: dict, params: SamplingParams) -> tuple[int, int]:
        """Append one answer to ``row``; run a tool call it closed, as the local engine does (→ (calls, failures)
        made): a call closed on the budget's last token runs and counts, with no room left for its output."""
        tokens = list(choice["token_ids"])
        logprobs = choice["logprobs"]["token_logprobs"] if params.temperature > 0 else [0.0] * len(tokens)
        start = len(row.tokens)
        row.tokens += tokens
        row.logprobs += [float(x) for x in logprobs]
        row.mask += [1.0] * len(tokens)
        room, tok = self._room(row, params), self.tokenizer
        if tokens[-1] in self.stop_ids:
            row.finished = row.done = True
            return 0, 0
        if self.tools is None or tokens[-1] != tok.tool_end_id:
            row.done = True  # the budget (or the server's context) ran out
            return 0, 0
        opened = [i for i in range(start, len(row.tokens) - 1) if row.tokens[i] == tok.tool_start_id]
        if not opened:  # a stray <|tool_end|> is just a token: the row goes on
            row.done = room <= 0
            return 0, 0
        result = self.tools.run(tok.decode(row.tokens[opened[-1] + 1 : -1]))
        forced = [tok.output_start_id, *tok.encode(result), tok.output_end_id][: max(room, 0)]
        row.tokens += forced
        row.logprobs += [0.0] * len(forced)
        row.mask += [0.0] * len(forced)
        row.done = self._room(row, params) <= 0
        return 1, int(result.startswith("error"))

    def _batch(self, rows: list[_Row], prompts: int, n: int, calls: int, failures: int) -> RolloutBatch:
        width = max(len(row.tokens) for row in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
        logprobs, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            logprobs[i, : len(row.tokens)] = torch.tensor(row.logprobs)
            mask[i, : len(row.tokens)] = torch.tensor(row.mask)
        return RolloutBatch(
            prompt_ids=[row.prompt for row in rows], completion_ids=ids, logprobs=logprobs, mask=mask,
            lengths=torch.tensor([len(row.tokens) for row in rows]),
            finished=torch.tensor([row.finished for row in rows]),
            group_ids=torch.arange(prompts).repeat_interleave(n), tool_calls=calls, tool_failures=failures)

    def close(self) -> None:
        """Stop the server we started; remove the temporary snapshot, but keep its ``vllm.log`` when something
        failed (the error named it)."""
        try:
            if self.server is not None:
                self.server.close()
        finally:
            self.failed |= self.server is not None and self.server.failed
            self.server = None
            if self.own_dir and self.root is not None:
                shutil.rmtree(self.model_dir if self.failed else self.root, ignore_errors=True)
