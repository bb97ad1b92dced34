"""Serving-parity checks for an exported GGUF, run at export time and failing loudly.

Both checks read the GGUF back through transformers' own GGUF loader (`gguf_file=`), an
implementation independent of tunesmith's writer, and compare it with the HF checkpoint it came from.

Logit tolerances are relative to the largest reference logit (`max |logit|`), because the error of a
rounded weight grows with the size of the activations it multiplies.

Two comparisons. The conversion check compares the GGUF with the checkpoint whose weights were rounded
in torch exactly as the file stores them (f16, bf16, or llama.cpp's Q8_0 blocks): any conversion bug or
damaged tensor shows up there, whatever the dtype, because the two compute the same thing (measured: bit
for bit, 0 difference, for f16, bf16 and q8_0 on SmolLM2-135M). The rounding-damage check compares the GGUF
with the checkpoint as it is, within a tolerance per dtype set from measurements (docs/deploy.md lists
them): the worst relative error observed was 1.4e-3 (f16, SmolLM2-135M), 8.3e-3 (bf16, the 2-layer test
model) and 3.3e-2 (q8_0, SmolLM2-135M). f32 is a bit-exact copy, so its tolerance only absorbs float
summation order. A wrong Q/K layout measured 0.85 (test model) and 0.88 (SmolLM2), and noise of 15% of
one matrix's own scale (std) in SmolLM2's layer-15 down_proj 0.068 against the unrounded model and 0.047
against the rounded one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TunesmithError

RELATIVE_TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 2.5e-2, "q8_0": 5e-2}
# The GGUF against the checkpoint with its weights rounded as the file stores them: bit-exact where measured
# (0 for f16, bf16 and q8_0 on SmolLM2-135M); this only absorbs float32 summation order and metadata rounding.
ROUNDED_TOLERANCE = 1e-4

SAMPLE_CONVERSATION: list[dict[str, str]] = [
    {"role": "system", "content": "You are a concise assistant.  Answer in one line."},
    {"role": "user", "content": "My card (ending 4021) was charged twice: $12.50 on 3/14 - why?"},
    {"role": "assistant", "content": "A pending hold can show twice;\nit drops off in 3-5 days."},
    {"role": "user", "content": "ok... and the refund_not_showing_up case? Übersicht, café, 東京 🙂"},
]


def _as_dicts(conversation: Any) -> list[dict[str, str]]:
    """Accept a tunesmith Conversation, a list of Message, or a list of {"role", "content"} dicts."""
    messages = getattr(conversation, "messages", conversation)
    return [m.as_dict() if hasattr(m, "as_dict") else {"role": m["role"], "content": m["content"]}
            for m in messages]


@contextmanager
def _alone(gguf_path: Path) -> Iterator[tuple[str, str]]:
    """(folder, file name) of a folder holding only this GGUF, so transformers cannot pick up anything else."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise TunesmithError(f"{gguf_path} does not exist", hint="export the GGUF first")
    with tempfile.TemporaryDirectory(prefix="tunesmith-parity-") as tmp:
        os.symlink(gguf_path, Path(tmp) / "model.gguf")
        yield tmp, "model.gguf"


def load_gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    with _alone(gguf_path) as (folder, name):
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_gguf_model(gguf_path: Path):
    from transformers import AutoModelForCausalLM

    with _alone(gguf_path) as (folder, name):
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _ids(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _stop_ids(hf_dir: Path, tokenizer) -> set[int]:
    from transformers import GenerationConfig

    stops = {tokenizer.eos_token_id} - {None}
    if (hf_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
        stops |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return stops


def check_tokenizer_parity(hf_dir: str | Path, gguf_path: str | Path, conversation: Any = None) -> dict:
    """The chat-rendered prompt tokenizes to the same ids through the HF tokenizer and the GGUF's.

    Also checks the chat template is byte-identical and EOS/stop tokens agree. Returns a report dict;
    raises TunesmithError listing every mismatch.
    """
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    conversation = _as_dicts(conversation if conversation is not None else SAMPLE_CONVERSATION)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    gguf_tok = load_gguf_tokenizer(Path(gguf_path))

    problems = []
    if hf_tok.chat_template != gguf_tok.chat_template:
        problems.append("the chat template in the GGUF differs from the checkpoint's")
    hf_ids = _ids(hf_tok, conversation)
    gguf_ids = _ids(gguf_tok, conversation) if gguf_tok.chat_template else []
    if hf_ids != gguf_ids:
        at = _first_difference(hf_ids, gguf_ids)
        problems.append(f"chat prompt token ids differ from position {at}: HF {hf_ids[at:at + 5]} vs "
                        f"GGUF {gguf_ids[at:at + 5]} (lengths {len(hf_ids)} vs {len(gguf_ids)})")
    text = hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    if hf_tok(text)["input_ids"] != gguf_tok(text)["input_ids"]:
        problems.append("the rendered prompt text tokenizes differently (check tokenizer.ggml.pre / add_bos)")
    if hf_tok.eos_token_id != gguf_tok.eos_token_id:
        problems.append(f"EOS id differs: HF {hf_tok.eos_token_id} vs GGUF {gguf_tok.eos_token_id}")
    stops = _stop_ids(hf_dir, hf_tok)
    for stop in sorted(stops):
        if gguf_tok.convert_ids_to_tokens(stop) != hf_tok.convert_ids_to_tokens(stop):
            problems.append(f"stop token {stop} is {hf_tok.convert_ids_to_tokens(stop)!r} in HF but "
                            f"{gguf_tok.convert_ids_to_tokens(stop)!r} in the GGUF")
    report = {"tokens": len(hf_ids), "eos_id": hf_tok.eos_token_id, "stop_ids": sorted(stops),
              "template_identical": hf_tok.chat_template == gguf_tok.chat_template, "problems": problems}
    if problems:
        raise TunesmithError(f"tokenizer parity failed for {gguf_path}:\n  - " + "\n  - ".join(problems),
                             hint="the GGUF would not tokenize prompts like the fine-tuned model; do not serve it")
    return report


def sample_input_ids(hf_dir: Path, max_tokens: int = 64) -> torch.Tensor:
    """Token ids of the sample conversation (real text through the real template), as a (1, n) batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if tokenizer.chat_template:
        ids = _ids(tokenizer, SAMPLE_CONVERSATION)
    else:
        ids = tokenizer(" ".join(m["content"] for m in SAMPLE_CONVERSATION))["input_ids"]
    return torch.tensor([ids[:max_tokens]])


def q8_0_round(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded as llama.cpp's Q8_0 stores it (quantize_row_q8_0_ref), back in float32: blocks of 32
    along each row, scale d = max |x| / 127 kept in f16, q = x / d rounded half away from zero (C roundf)."""
    x = weight.detach().float().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    v = x * torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    whole = torch.trunc(v)
    q = whole + torch.sign(v) * ((v - whole).abs() >= 0.5)
    return (q * d.half().float()).reshape(weight.shape)


_ROUNDING = {"F32": lambda w: w, "F16": lambda w: w.half().float(), "BF16": lambda w: w.bfloat16().float(),
             "Q8_0": q8_0_round}


def round_like_gguf(model: torch.nn.Module, hf_dir: Path, gguf_path: Path) -> None:
    """Round every weight of `model` (in place) the way the GGUF stores it, read from the file's own tensor
    types. Rounding works within rows, so it commutes with the Q/K row interleave of the llama layout."""
    import gguf

    from .gguf import gguf_tensor_name, model_shape, read_config

    shape = model_shape(read_config(hf_dir), hf_dir)
    name_map = gguf.get_tensor_name_map(shape.arch, shape.n_layers)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_path).tensors}
    with torch.no_grad():
        for hf_name, param in model.named_parameters():  # a tied lm_head is the embedding's parameter
            name = gguf_tensor_name(name_map, hf_name, str(hf_dir))
            if stored.get(name) not in _ROUNDING:
                raise TunesmithError(f"{gguf_path}: tensor {name} is {stored.get(name, 'missing')}",
                                     hint="parity is checked for the GGUF types tunesmith writes (F32/F16/BF16/Q8_0)")
            param.copy_(_ROUNDING[stored[name]](param))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def check_logits_parity(hf_dir: str | Path, gguf_path: str | Path, dtype: str,
                        input_ids: torch.Tensor | None = None) -> dict:
    """Logits of the GGUF (read back by transformers) against the HF checkpoint's, two ways:

    - conversion: against the checkpoint with every weight rounded as the file stores it (`round_like_gguf`),
      which must agree to float32 summation noise (ROUNDED_TOLERANCE) for every dtype;
    - rounding damage: against the checkpoint as it is, within the dtype's RELATIVE_TOLERANCE.

    Returns the report of `logit_parity_report`; raises TunesmithError when either check fails.
    """
    report = logit_parity_report(hf_dir, gguf_path, dtype, input_ids)
    raise_on_parity_failure(report, Path(gguf_path))
    return report


def logit_parity_report(hf_dir: str | Path, gguf_path: str | Path, dtype: str,
                        input_ids: torch.Tensor | None = None) -> dict:
    """The measurements `check_logits_parity` judges: {"dtype", "max_abs_diff", "logit_scale", "tolerance",
    "relative_diff", "argmax_agreement", "rounded_max_abs_diff", "rounded_tolerance"}."""
    from transformers import AutoModelForCausalLM

    if dtype not in RELATIVE_TOLERANCE:
        raise TunesmithError(f"no logit tolerance for dtype {dtype!r}", hint=f"one of {', '.join(RELATIVE_TOLERANCE)}")
    hf_dir, gguf_path = Path(hf_dir), Path(gguf_path)
    ids = input_ids if input_ids is not None else sample_input_ids(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reference = _logits(model, ids)
    exported = _logits(load_gguf_model(gguf_path), ids)
    if exported.shape != reference.shape:
        raise TunesmithError(f"logit shapes differ: HF {tuple(reference.shape)} vs GGUF {tuple(exported.shape)}")
    if dtype != "f32":
        round_like_gguf(model, hf_dir, gguf_path)
        rounded = _logits(model, ids)
    else:
        rounded = reference
    scale = reference.abs().max().item()
    max_diff, rounded_diff = (exported - reference).abs().max().item(), (exported - rounded).abs().max().item()
    return {"dtype": dtype, "max_abs_diff": max_diff, "logit_scale": scale,
            "tolerance": RELATIVE_TOLERANCE[dtype] * scale, "relative_diff": max_diff / scale if scale else float("inf"),
            "argmax_agreement": (exported.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "rounded_max_abs_diff": rounded_diff, "rounded_tolerance": ROUNDED_TOLERANCE * scale}


def raise_on_parity_failure(report: dict, gguf_path: Path) -> None:
    dtype, scale = report["dtype"], report["logit_scale"]
    if not report["rounded_max_abs_diff"] <= report["rounded_tolerance"]:  # also catches NaN
        raise TunesmithError(
            f"logit parity failed for {gguf_path}: the GGUF does not compute what the checkpoint computes with its "
            f"weights rounded to the file's types (max |difference| {report['rounded_max_abs_diff']:.4g} > "
            f"{report['rounded_tolerance']:.4g} = {ROUNDED_TOLERANCE} x max |logit| {scale:.4g})",
            hint="a conversion bug or a damaged file; do not serve it")
    if not report["max_abs_diff"] <= report["tolerance"]:
        raise TunesmithError(
            f"logit parity failed for {gguf_path}: max |difference| {report['max_abs_diff']:.4g} > tolerance "
            f"{report['tolerance']:.4g} ({dtype}: {RELATIVE_TOLERANCE[dtype]} x max |logit| {scale:.4g}); argmax "
            f"agreement {report['argmax_agreement']:.1%}",
            hint=f"{dtype} rounding changes this model's outputs more than it should; export f16 instead")
