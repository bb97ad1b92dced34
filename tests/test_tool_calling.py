"""Tool-calling conversations end to end on a tiny model whose chat template supports tools: trained on the
calls (never on the results), then the `tool_call` metric through the Python API and the CLI; and the metric's
parsing of the common call syntaxes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunesmith
from tunesmith.cli import main
from tunesmith.data.tools import parse_calls
from tunesmith.eval.metrics import parse_metric

# Qwen2.5's tool template with its long instructions cut, so that rows fit the tiny model's 512 positions
TEMPLATE = (Path(__file__).parent / "fixtures" / "templates" / "qwen2_5_tools.jinja").read_text().replace(
    "You may call one or more functions to assist with the user query.\\n\\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\\n", "").replace(
    "\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call>", "")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Six ways to ask for the same call: the tiny model cannot learn to copy a city from the prompt, but it can learn
# the call syntax and its arguments; wrong functions and arguments are covered by the metric's own tests.
ASKS = ["weather in Paris", "Paris weather?", "is it cold in Paris", "will it rain in Paris", "Paris forecast",
        "how warm is Paris today"]


# --- the metric ---------------------------------------------------------------------------------------------

def test_calls_are_parsed_from_each_template_syntax():
    want = [("get_weather", {"city": "Paris"})]
    assert parse_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') == want
    assert parse_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}') == want  # Llama-3.1
    assert parse_calls('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a"}]') == want
    assert parse_calls('[{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]') == want  # JSON text
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    assert parse_calls(two) == [("a", {}), ("b", {"x": 1})]
    assert parse_calls("It is sunny in Paris.") == [] and parse_calls('{"answer": 42}') == []
    assert parse_calls('<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>') is None
    assert parse_calls('[{"name": "get_weather", "arguments": {"city": "Paris"}') is None


def test_tool_call_metric_scores_function_and_arguments():
    from tunesmith.data.types import ToolCall

    metric = parse_metric("tool_call")
    reference = ToolCall("get_weather", {"city": "Paris", "days": 2}).text  # what eval references hold
    assert metric.binary and metric.higher_is_better and not metric.needs_logprobs
    assert metric.score('<tool_call>{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}</tool_call>',
                        reference) == 1.0  # argument order does not matter
    assert metric.score('{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}', reference) == 1.0
    assert metric.score('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>',
                        reference) == 0.0
    assert metric.score('<tool_call>{"name": "get_time", "arguments": {"city": "Paris", "days": 2}}</tool_call>',
                        reference) == 0.0
    assert metric.score("I think it is sunny.", reference) == 0.0
    assert metric.details("I think it is sunny.", reference) == {"unparsed": False, "right_functions": False}
    assert metric.score("It is sunny.", "It is 21 degrees.") == 1.0  # no call wanted, none made
    assert metric.score(reference, "It is 21 degrees.") == 0.0
    with pytest.raises(tunesmith.errors.TunesmithError, match="takes no argument"):
        parse_metric("tool_call:x")


# --- end to end ---------------------------------------------------------------------------------------------

def row(ask: str, answered: bool) -> dict:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ask},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]}]
    if answered:
        messages += [{"role": "tool", "tool_call_id": "c1", "content": "RESULT_TEXT"},
                     {"role": "assistant", "content": "sunny"}]
    return {"tools": [WEATHER], "messages": messages}


@pytest.fixture(scope="module")
def tool_env(tmp_path_factory):
    from tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tools")
    tok = build_tokenizer(root / "model", chat_template=TEMPLATE)
    model = build_model(None, vocab_size=len(tok))
    with torch.no_grad():  # a learned (non-zero) EOS row, so that the model can learn to stop
        model.get_input_embeddings().weight[tok.eos_token_id].normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(root / "model")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(row(a, answered=i % 2 == 0)) + "\n" for i, a in enumerate(ASKS)))
    calls = root / "calls.jsonl"  # eval: the prompt, and the call as the reference answer
    calls.write_text("".join(json.dumps(row(a, answered=False)) + "\n" for a in ASKS))
    return {"root": root, "model": root / "model", "train": train, "calls": calls, "tok": tok}


@pytest.fixture(scope="module")
def tool_run(tool_env):
    config = {"name": "tools", "output_dir": str(tool_env["root"] / "runs"), "model": str(tool_env["model"]),
              "device": "cpu", "precision": "fp32", "data": {"train": str(tool_env["train"]), "max_length": 512},
              "adapter": {"kind": "lora", "r": 16, "alpha": 32},
              "train": {"lr": 1e-2, "max_steps": 40, "micro_batch_size": 6, "warmup_ratio": 0.0,
                        "schedule": "constant"},
              "eval": {"data": str(tool_env["calls"]), "candidates": ["base", "tuned"], "metrics": ["tool_call"],
                       "max_new_tokens": 96}}
    return tunesmith.train(config, progress=False)


def test_tool_calls_train_on_calls_and_answers_never_results(tool_env):
    from tunesmith.data.load import load_examples
    from tunesmith.data.render import IGNORE, Renderer

    tok = tool_env["tok"]
    answered = load_examples(str(tool_env["train"])).examples[0]
    item = Renderer(tok).sft(answered)
    trained = tok.decode([x for x in item.labels if x != IGNORE])
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
                       "sunny<|im_end|>")  # the call and the answer; the tool result and the definitions never
    assert "RESULT_TEXT" in tok.decode(item.input_ids) and "RESULT_TEXT" not in trained


def test_a_tuned_run_wins_on_the_tool_call_metric(tool_run):
    scores = tool_run.info["eval"]["scores"]["tool_call"]
    assert scores["tuned"]["mean"] == 1.0 and scores["base"]["mean"] == 0.0
    assert tool_run.info["eval"]["won"] is True
    results = json.loads((tool_run.path / "eval" / "results.json").read_text())
    reference = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert all(r["reference"] == reference for r in results["examples"])
    output = results["examples"][1]["outputs"]["tuned"]
    assert output.startswith("<tool_call>\n{") and parse_calls(output) == [("get_weather", {"city": "Paris"})]


def test_tool_call_eval_through_the_cli(tool_env, tool_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(tool_env["calls"]), "--candidates", f"base,{tool_run.path}", "--metric",
                 "tool_call", "--require-win", "--out", str(out), "--device", "cpu", "--precision", "fp32",
                 "--max-new-tokens", "96"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["scores"]["tool_call"][str(tool_run.path)] for r in results["examples"]] == [1.0] * len(ASKS)
    assert "beats base" in capsys.readouterr().err


def test_the_peft_export_tells_vllm_which_tool_parser_reads_the_calls(tool_run, tmp_path):
    from tunesmith.export.run import export_run

    result = export_run(tool_run.path, "peft", out=tmp_path / "peft")
    assert result.commands[0].endswith("--enable-auto-tool-choice --tool-call-parser hermes")
    assert "--tool-call-parser hermes" in (tmp_path / "peft" / "README.md").read_text()


def test_data_preview_marks_the_trained_call_tokens_and_check_refuses_a_template_without_tools(tool_env, tiny_dir,
                                                                                               capsys):
    assert main(["data", "preview", str(tool_env["train"]), "--model", str(tool_env["model"]), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert ('<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\nRESULT_TEXT\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n[[sunny<|im_end|>]]") in out
    assert main(["data", "check", str(tool_env["train"]), "--model", str(tool_env["model"])]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(tool_env["train"]), "--model", str(tiny_dir)]) == 1  # ChatML without tools
    out = capsys.readouterr().out
    assert "6 example(s) cannot be rendered: the chat template of tokenizer" in out
    assert "does not render tool definitions: 'get_weather'" in out
