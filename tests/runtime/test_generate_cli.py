"""`hpipe generate` as a user runs it: a text prompt in, text out, streamed as it is made.

A tiny LLaMA saved by transformers and a word-level tokenizer trained (``tokenizers``) on
a few sentences at test time make the weights folder; `hpipe execute` on it reports the
decode figures and the text.  Also: ids in and out without a tokenizer, a text prompt
without one (exit 2), and generation across two torchrun agents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hpipe.errors import InputError  # noqa: E402

from runtime_helpers import CORE, TINY_LLAMA, run_two_hosts_with_torchrun, save_hf_llama  # noqa: E402

pytestmark = [pytest.mark.timeout(360), pytest.mark.slow]  # several subprocesses that import torch
ROOT = Path(__file__).resolve().parents[2]
SENTENCES = ["the cat sat on the mat", "a dog ran in the park and the cat ran too",
             "long documents need long context", "pipelines split the model over devices",
             "every token crosses the slow link again", "the answer comes as text as it is written"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _hpipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hpipe", *args], capture_output=True, text=True, env=_env(),
                          timeout=150, cwd=cwd)


def _save_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=128, special_tokens=["[UNK]"]))
    assert tok.get_vocab_size() <= 128
    tok.save(str(folder / "tokenizer.json"))
    return tok


def _scenario(path: Path, weights: str | None = None, **workload):
    data = {"name": "tiny", "model": TINY_LLAMA, "dtype": "float32",
            "workload": {"seq_len": 16, "batch_size": 2, **workload},
            "cluster": {"hosts": [{"name": "local", "devices": [{**CORE, "count": 2}]}]},
            "planner": {"kind": "gpipe", "token_granularity": 8}}
    if weights:
        data["weights"] = weights
    path.write_text(yaml.safe_dump(data))


def test_text_prompt_streams_text_equal_to_transformers(tmp_path):
    model = save_hf_llama(tmp_path / "model")
    tok = _save_tokenizer(tmp_path / "model")
    _scenario(tmp_path / "tiny.yaml", weights="model")
    prompt = "the cat sat on the mat and the dog ran in the park"  # 13 tokens: not a multiple of 8
    proc = subprocess.Popen([sys.executable, "-m", "hpipe", "generate", "tiny.yaml", "--prompt", prompt,
                             "--max-new-tokens", "24", "--stream", "--check", "--json", "out.json"],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "err.txt", "wb"), cwd=tmp_path, env=_env())
    chunks = []

    def read():  # every read as it comes, with its arrival time
        while True:
            b = os.read(proc.stdout.fileno(), 65536)
            if not b:
                return
            chunks.append((time.monotonic(), b))

    reader = threading.Thread(target=read)
    reader.start()
    proc.wait(timeout=150)
    t_exit = time.monotonic()
    reader.join(5)
    err = (tmp_path / "err.txt").read_bytes()
    assert proc.returncode == 0, err.decode()
    streamed = b"".join(c for _, c in chunks).decode()
    res = json.loads((tmp_path / "out.json").read_text())["results"][0]
    ids = res["generated_ids"][0]
    assert len(ids) == 24 and res["text"] == [tok.decode(ids)]
    assert streamed == res["text"][0] + "\n"  # the stream is the final text
    # streamed as made: in several pieces, the first well before the process ended (after --check)
    assert len(chunks) >= 2 and chunks[0][0] < t_exit
    assert "--check: the greedy ids" in err.decode()
    # ids the word-level tokenizer (fewer words than the model's 128 ids) has no token for: said
    from hpipe.runtime.generation import ids_without_tokens

    missing = [i for i in dict.fromkeys(ids) if tok.id_to_token(i) is None]
    assert ids_without_tokens(tok, [ids]) == missing and tok.get_vocab_size() < 128
    assert ("tokenizer.json has no token for" in " ".join(err.decode().split())) == bool(missing), err.decode()
    # the ids are transformers' own greedy continuation of the encoded prompt
    x = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        hf = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24, pad_token_id=0)
    assert ids == hf[0, x.shape[1]:].tolist()
    assert res["ttft_s"] > 0 and res["tpot_s"] > 0 and res["predicted_latency_s"] > 0
    # the table's predicted TTFT and TPOT are in the JSON too, for scripts that compare them
    assert 0 < res["predicted_ttft_s"] < res["predicted_latency_s"] and res["predicted_tpot_s"] > 0

    # the same prompt from standard input (--prompt-file -), behind a UTF-8 byte-order mark
    r = subprocess.run([sys.executable, "-m", "hpipe", "generate", "tiny.yaml", "--prompt-file", "-",
                        "--max-new-tokens", "24", "--json", "-"], input=("\ufeff" + prompt).encode(),
                       capture_output=True, env=_env(), timeout=150, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["results"][0]["generated_ids"][0] == ids

    # `hpipe execute` on the same folder: generated ids and their text in the Result
    _scenario(tmp_path / "gen.yaml", weights="model", output_tokens=4)
    r = subprocess.run([sys.executable, "-m", "hpipe", "execute", "gen.yaml", "--json", "-"], capture_output=True,
                       text=True, env=_env(), timeout=150, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert res["text"] == [tok.decode(g) for g in res["generated_ids"]]
    assert [len(g) for g in res["generated_ids"]] == [4, 4]  # the scenario's batch of random prompts
    assert 0 < res["ttft_s"] < res["latency_s"] and res["tpot_s"] > 0 and res["tpot_p90_s"] >= res["tpot_s"]
    assert res["output_tokens_per_s"] == pytest.approx(8 / res["latency_s"])


def _main_in_process(args, cwd, monkeypatch, capsys):
    """The CLI's entry point in this process (an input error never starts a worker)."""
    from hpipe.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["hpipe", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def test_ids_without_tokenizer_and_text_refused(tmp_path, monkeypatch, capsys):
    _scenario(tmp_path / "tiny.yaml")
    code, err = _main_in_process(["generate", "tiny.yaml", "--prompt", "hello"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "needs a tokenizer" in err and "--inputs" in err and "Traceback" not in err, err
    code, err = _main_in_process(["generate", "tiny.yaml", "--prompt-file", "missing.txt"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "missing.txt" in err and "no such file" in err, err  # the file, not the tokenizer
    ids = [[i % 128 for i in range(10)], [(5 * i) % 128 for i in range(10)]]
    (tmp_path / "bad.json").write_text(json.dumps([ids[0], ids[1][:4]]))
    code, err = _main_in_process(["generate", "tiny.yaml", "--inputs", "bad.json"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "bad.json" in err and "one length" in err, err
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "5", "--stream", "--check",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()  # two sequences: "[k] id" per token as they come
    assert len(lines) == 10 and {ln.split()[0] for ln in lines} == {"[0]", "[1]"}


def test_two_hosts_with_torchrun_generate(tmp_path):
    """Generation across two torchrun agents (emulated hosts on this machine) equals the
    one-process loop; node ranks in the opposite order of the plan's stages."""
    import numpy as np

    from hpipe.runtime.generation import reference_generate
    from hpipe.runtime.launcher import make_ids
    from hpipe.runtime.weights import weight_source
    from hpipe.scenario import load_scenario

    core = {**CORE, "count": 1}
    data = {"name": "two-hosts", "model": TINY_LLAMA, "dtype": "float32",
            "workload": {"seq_len": 16, "batch_size": 2, "output_tokens": 8},
            "cluster": {"hosts": [{"name": "ha", "address": "127.0.0.1", "devices": [core]},
                                  {"name": "hb", "address": "127.0.0.1", "devices": [core]}],
                        "network": {"bandwidth_gbps": 1, "latency_us": 100}},
            "planner": {"kind": "hpipe", "token_granularity": 8}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(data))
    plan = {"planner": "hand", "scenario": "two-hosts", "slices": [8, 8], "micro_batches": 1, "decode_micro_batches": 2,
            "stages": [{"devices": ["hb/core-0"], "units": [0, 3]}, {"devices": ["ha/core-0"], "units": [3, 6]}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**_env(), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    run_two_hosts_with_torchrun("two.yaml", "plan.json", [], "out.json", env=env, cwd=tmp_path)
    r = json.loads((tmp_path / "out.json").read_text())["results"][0]
    setup = load_scenario(tmp_path / "two.yaml").resolve()
    ref, _ = reference_generate(setup.model, weight_source(setup.model, None), make_ids(setup), 8)
    assert r["generated_ids"] == ref and r["ttft_s"] > 0 and r["tpot_s"] > 0
    assert np.isfinite(r["output_tokens_per_s"])


def test_a_run_past_the_trained_context_is_announced(tmp_path):
    """A LLaMA computes past max_position_embeddings (rotary positions have no end), so hpipe
    runs it, but says first that the text will suffer; within the context it says nothing."""
    from types import SimpleNamespace

    from hpipe.models import get_model
    from hpipe.runtime.generation import past_trained_context

    spec = get_model("tiny-llama")  # 2048 positions
    at = lambda n, new: SimpleNamespace(seq_len=n, output_tokens=new, weights=None)  # noqa: E731
    # 2000 + 49: positions 0..2047 computed (the 49th new token is never fed back)
    assert past_trained_context(at(2000, 49), spec) is None
    assert "at 2049 positions" in past_trained_context(at(2000, 50), spec)
    assert "past the 2048" in past_trained_context(at(2000, 50), spec)
    assert "2100 tokens run the model at 2100 positions" in past_trained_context(at(2100, 0), spec)  # prefill
    assert past_trained_context(at(2000, 50), get_model("gpt3-2.7b")) is None  # refused elsewhere

    save_hf_llama(tmp_path / "model", max_position_embeddings=16)
    _scenario(tmp_path / "tiny.yaml", weights="model")
    (tmp_path / "ids.json").write_text(json.dumps([[i % 128 for i in range(10)]]))
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "10 prompt + 8 new tokens run the model at 17 positions" in err, r.stderr
    assert "past the 16" in err and "max_position_embeddings" in err and len(r.stdout.split()) == 8
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "8", "-q", cwd=tmp_path)
    assert r.returncode == 0 and "past the 16" in " ".join(r.stderr.split()), r.stderr  # a warning: -q keeps it
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "7", cwd=tmp_path)
    assert r.returncode == 0 and "past the" not in r.stderr, r.stderr


def test_a_gpt_prompt_off_the_granularity_is_held_to_its_own_positions(tmp_path):
    """A 25-token prompt is planned as 32 (granularity 8) but runs at 25: with 8 new tokens it
    computes 32 positions, all of a 32-position GPT's, and is allowed; 9 are refused with the
    prompt's real length, and at --max-new-tokens when that set the number."""
    from hpipe.runtime.generation import setups_for
    from hpipe.scenario import load_scenario

    from runtime_helpers import TINY_GPT

    data = {"name": "tgpt", "model": {**TINY_GPT, "max_seq_len": 32}, "dtype": "float32",
            "workload": {"seq_len": 16, "batch_size": 1},
            "cluster": {"hosts": [{"name": "local", "devices": [{**CORE, "count": 2}]}]},
            "planner": {"kind": "gpipe", "token_granularity": 8}}
    (tmp_path / "tgpt.yaml").write_text(yaml.safe_dump(data))
    ids = [[i % 100 for i in range(25)]]
    run, plan_on = setups_for(load_scenario(tmp_path / "tgpt.yaml"), ids, 8)
    assert (run.seq_len, plan_on.seq_len, run.output_tokens) == (25, 32, 8)
    with pytest.raises(InputError, match="25 prompt \\+ 9 output tokens use 33 positions") as e:
        setups_for(load_scenario(tmp_path / "tgpt.yaml"), ids, 9)
    assert e.value.field == "workload.output_tokens"
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    r = _hpipe("generate", "tgpt.yaml", "--inputs", "ids.json", "--max-new-tokens", "9", cwd=tmp_path)
    assert r.returncode == 2 and "'--max-new-tokens'" in r.stderr and "33 positions" in r.stderr, r.stderr
    # a prompt whose rounded-up length passes the table: 30 tokens planned as 32 of 31 positions
    data["model"]["max_seq_len"] = 31
    (tmp_path / "tgpt.yaml").write_text(yaml.safe_dump(data))
    run, plan_on = setups_for(load_scenario(tmp_path / "tgpt.yaml"), [[1] * 30], 2)
    assert (run.seq_len, plan_on.seq_len) == (30, 32)


def test_generate_under_auto_says_its_choice_and_prices_every_prompt_on_the_scenarios_profile(tmp_path):
    """costmodel: auto in generate: the choice for the scenario as written (the profile execute
    measures), said on stderr; a prompt of another length is planned and predicted on that same
    profile, and generate measures none itself.  Before, generate said nothing, and each prompt
    shape looked up a profile of its own (a cache key per workload): a 10-token prompt planned
    on the roofline beside a 16-token one on the fitted profile."""
    _scenario(tmp_path / "tiny.yaml")
    data = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**data, "costmodel": "auto"}))
    env = {**_env(), "HPIPE_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "ids.json").write_text(json.dumps([[(3 * i + k) % 128 for i in range(10)] for k in range(2)]))
    r = subprocess.run([sys.executable, "-m", "hpipe", "generate", "tiny.yaml", "--inputs", "ids.json",
                        "--max-new-tokens", "3", "-q"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "measuring" not in r.stderr, r.stderr  # no profile yet: the roofline, said
    assert "cost model auto: roofline" in r.stderr and "hpipe execute tiny.yaml" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "hpipe", "execute", "tiny.yaml", "-q"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "measuring a quick one" in r.stderr, r.stderr
    runs = []
    for n in (16, 10):  # the scenario's own length, then another
        (tmp_path / "ids.json").write_text(json.dumps([[(3 * i + k) % 128 for i in range(n)] for k in range(2)]))
        r = subprocess.run([sys.executable, "-m", "hpipe", "generate", "tiny.yaml", "--inputs", "ids.json",
                            "--max-new-tokens", "3", "--json", "out.json"], capture_output=True, text=True,
                           env=env, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        out = json.loads((tmp_path / "out.json").read_text())
        runs.append((r.stderr, out["cost_model"]))
        # the plan's own figures were the rounded-up prompt's: dropped, not left beside the run's
        res = out["results"][0]
        assert res["plan"]["predicted"].get("latency_s", res["predicted_latency_s"]) == res["predicted_latency_s"]
    (first_err, first), (second_err, second) = runs
    assert "measuring" not in first_err + second_err
    assert "cost model auto: fitted" in second_err, second_err
    assert "timed no decode steps" in " ".join(second_err.split())  # the scenario's profile is prefill-only
    profiles = list((tmp_path / "cache" / "profiles").glob("tiny-*.json"))
    assert len(profiles) == 1
    for cm in (first, second):
        assert cm["kind"] == "fitted" and cm["auto"]["used"] == "fitted"
        assert Path(cm["profile_path"]).resolve() == profiles[0].resolve()


def test_generate_checks_the_prompts_batch_not_the_scenarios(tmp_path):
    """The memory checks take the prompts' shape: a scenario whose own batch would not fit
    still generates for two short prompts (no profile of that batch is measured either)."""
    _scenario(tmp_path / "tiny.yaml", seq_len=8192, batch_size=512)
    data = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**data, "costmodel": "auto"}))
    (tmp_path / "ids.json").write_text(json.dumps([[(3 * i + k) % 128 for i in range(10)] for k in range(2)]))
    env = {**_env(), "HPIPE_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "hpipe", "generate", "tiny.yaml", "--inputs", "ids.json",
                        "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "measuring" not in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 2


def test_streamed_text_holds_back_a_character_split_across_byte_tokens(capsys):
    """A byte-level tokenizer splits 日 into three tokens: the stream printed U+FFFD for the
    first and then skipped the character; it now waits for the character to be whole, and the
    streamed text equals the decoded text, one sequence or several."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from hpipe.cli.running import _Streamer

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols, one token each
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = "日本語 naïve ok"
    ids = tok.encode(text).ids
    assert len(ids) > len(text) and tok.decode(ids) == text  # bytes, not characters
    for batch in (1, 2):
        s = _Streamer(tok, batch)
        for i in ids:
            s([(k, i) for k in range(batch)])
        s.close()
        out = capsys.readouterr().out
        assert "\ufffd" not in out, out
        if batch == 1:
            assert out == text + "\n"
        else:
            assert "".join(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("[0]")) == \
                text.replace(" ", "")


def test_a_prompt_off_the_granularity_is_not_refused_for_its_rounded_length(tmp_path):
    """Plans are searched for the prompt rounded up to the token granularity (9 tokens planned
    as 16); where that length does not fit but the prompt does, generate had exited 3 quoting
    the 16. It now plans on the prompt's own length there."""
    from hpipe.memory import model_need_bytes
    from hpipe.runtime.generation import setups_for
    from hpipe.scenario import load_scenario

    _scenario(tmp_path / "tiny.yaml", seq_len=16, batch_size=64)
    data = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    data["cluster"]["hosts"][0]["devices"][0]["count"] = 1
    data["planner"] = {"kind": "hpipe", "token_granularity": 8}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    ids = [[(5 * i + k) % 128 for i in range(9)] for k in range(64)]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    run, planned = setups_for(load_scenario(tmp_path / "tiny.yaml"), ids, 2)
    need = [sum(model_need_bytes(s)) for s in (run, planned)]  # weights + KV cache
    assert planned.seq_len == 16 and need[0] < need[1]
    memory_gb = (need[0] + need[1]) / 2 / 1e9  # room for 9 tokens' cache, not for 16
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "2", "-q", "--json", "out.json",
               "--set", f"cluster.hosts[0].devices[0].memory_gb={memory_gb}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sum(json.loads((tmp_path / "out.json").read_text())["results"][0]["plan"]["slices"]) == 9


def test_check_of_a_half_precision_run_passes_where_it_parts_at_a_near_tie(tmp_path):
    """bfloat16 stages part from the float32 loop at near-ties (here two prompts of three, within
    30 new tokens): --check failed that correct run (exit 1); it now passes it, and says so,
    because every pipelined pick, teacher-forced, is within bfloat16's tolerance of the best."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init: a model whose picks are not all near-ties
        for prm in model.parameters():
            prm.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    data = {"name": "tiny", "model": "tiny-llama", "dtype": "bfloat16", "weights": "model",
            "workload": {"seq_len": 32, "batch_size": 3},
            "cluster": {"hosts": [{"name": "local", "devices": [{**CORE, "count": 2}]}]},
            "costmodel": "roofline", "planner": {"kind": "hpipe", "token_granularity": 32}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "ids.json").write_text(json.dumps([[54, 260, 757, 438, 267, 496], [37, 863, 78, 15, 37, 334],
                                                   [362, 589, 277, 296, 685, 328]]))
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "30", "--check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--check passed: 1 of 3 sequences' greedy ids equal the one-process loop's; 2 part from it at a " \
        "near-tie" in " ".join(r.stderr.split()), r.stderr  # the case this test is for


def test_generate_says_what_it_does_not_read_and_an_early_end(tmp_path):
    """Found unsaid by a fresh-eyes tester: --set of the workload's shape (the prompts give it),
    top_k and seed under greedy picks, and every sequence stopping at EOS before the simulated
    count of new tokens."""
    save_hf_llama(tmp_path / "model")
    _scenario(tmp_path / "tiny.yaml", weights="model")
    (tmp_path / "ids.json").write_text(json.dumps([[(3 * i) % 128 for i in range(10)]]))
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "4", "--json", "out.json",
               "--set", "workload.batch_size=4", "--set", "workload.sampling.top_k=5", cwd=tmp_path)
    err = " ".join(r.stderr.split())
    assert r.returncode == 0, r.stderr
    assert "--set workload.batch_size=4 changes nothing here: generate takes the number of prompts (1)" in err, err
    assert "workload.sampling.top_k is for sampling; at temperature 0 generation is greedy" in err, err
    assert "end-of-sequence" not in err
    first = json.loads((tmp_path / "out.json").read_text())["results"][0]["generated_ids"][0][0]
    config = json.loads((tmp_path / "model" / "generation_config.json").read_text())
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": first}))
    r = _hpipe("generate", "tiny.yaml", "--inputs", "ids.json", "--max-new-tokens", "4", cwd=tmp_path)
    err = " ".join(r.stderr.split())
    assert r.returncode == 0 and r.stdout.split() == [str(first)], r.stdout + r.stderr
    assert "ended at its end-of-sequence token, after at most 1 of 4 new tokens" in err, err
