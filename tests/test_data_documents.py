"""Raw documents for continued pre-training: windows, separators, packing, cross-document attention, counts, and
what `data check` and `data preview` say about them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from tunesmith.data.batching import collate
from tunesmith.data.doctor import check_data
from tunesmith.data.documents import document_ids, end_of_text_id, render_documents, windows
from tunesmith.data.render import IGNORE, Renderer
from tunesmith.data.types import Document, Source
from tunesmith.errors import TunesmithError
from tunesmith.methods.logps import sequence_logps, token_logps


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def doc(text: str, n: int = 1) -> Document:
    return Document(text, Source("docs.jsonl", n))


def targets(item) -> list[int]:
    return [i for i, x in enumerate(item.labels) if x != IGNORE]


# --- windows ------------------------------------------------------------------------------------------------

def test_windows_by_hand():
    assert windows(10, 4, 0) == [(0, 4, 0), (4, 8, 4), (8, 10, 8)]
    assert windows(10, 4, 1) == [(0, 4, 0), (3, 7, 4), (6, 10, 7)]
    assert windows(4, 4, 0) == [(0, 4, 0)] and windows(3, 4, 2) == [(0, 3, 0)]
    assert windows(9, 5, 2) == [(0, 5, 0), (3, 8, 5), (6, 9, 8)]
    with pytest.raises(TunesmithError, match="window_overlap"):
        windows(10, 4, 3)


@pytest.mark.parametrize("n,length,overlap", [(1, 8, 0), (50, 8, 0), (50, 8, 1), (50, 8, 5), (64, 16, 4), (17, 16, 0)])
def test_every_token_is_a_target_at_most_once_and_overlap_is_context(n, length, overlap):
    covered = []
    for start, stop, first in windows(n, length, overlap):
        assert stop - start <= length and start <= first < stop or (start == first == 0)
        # a window's own targets: positions from `first` on, minus its first token (nothing precedes it)
        covered += [p for p in range(max(first, start + 1), stop)]
    assert len(covered) == len(set(covered))  # no token trained twice
    lost = set(range(1, n)) - set(covered)
    # overlap 0 loses the first token of each later window; any overlap trains every token but the first
    assert lost == ({s for s, _, _ in windows(n, length, 0)[1:]} if overlap == 0 else set())


def test_document_ids_end_with_end_of_text_and_read_special_strings_as_text(tok):
    eot = end_of_text_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|endoftext|>" and eot != tok.eos_token_id  # not <|im_end|>
    ids = document_ids(tok, "hello <|im_end|> world", eot, bos=False)
    assert ids[-1] == eot and tok.eos_token_id not in ids  # the string in the text is not the control token
    assert tok.decode(ids[:-1]) == "hello <|im_end|> world"


def test_documents_are_windowed_trained_in_full_and_counted(tok):
    text = "the quick brown fox jumps over the lazy dog " * 6
    ids = document_ids(tok, text, end_of_text_id(tok), bos=False)
    renderer = Renderer(tok, max_length=16, window_overlap=3)
    items = renderer.document(doc(text)) + renderer.document(doc("hello world", 2))
    n_windows = len(windows(len(ids), 16, 3))
    assert len(items) == n_windows + 1 and all(len(x) <= 16 for x in items)
    assert [x.source for x in items] == [Source("docs.jsonl", 1)] * n_windows + [Source("docs.jsonl", 2)]
    for item, (start, stop, first) in zip(items, windows(len(ids), 16, 3), strict=False):
        assert list(item.input_ids) == ids[start:stop]
        assert targets(item) == list(range(max(first - start, 1), stop - start))
        assert [item.labels[i] for i in targets(item)] == [item.input_ids[i] for i in targets(item)]
    short = items[-1]
    assert short.input_ids[-1] == end_of_text_id(tok) and targets(short) == list(range(1, len(short)))
    s = renderer.stats
    assert (s.documents, s.windows, s.dropped) == (2, n_windows + 1, 0)
    assert s.tokens == len(ids) + len(short) and s.trained_tokens == sum(x.n_target for x in items)
    assert s.trained_tokens == s.tokens - 2  # overlap >= 1: every token but each document's first
    assert renderer.stats.as_dict()["windows"] == n_windows + 1


def test_packed_windows_stay_apart_and_cross_document_windows_attend_across(tok, model):
    docs = [doc("hello world how are you today", 1), doc("the quick brown fox jumps over the lazy dog", 2)]
    apart, counts = render_documents(tok, docs, max_length=64)
    assert counts.windows == 2
    alone = [sequence_logps(model, collate([x], tok.pad_token_id)) for x in apart]
    packed = sequence_logps(model, collate(apart, tok.pad_token_id, pack_length=64))
    assert collate(apart, tok.pad_token_id, pack_length=64).input_ids.shape[0] == 1  # one row
    torch.testing.assert_close(packed.logp_sum, torch.cat([a.logp_sum for a in alone]), rtol=1e-5, atol=1e-5)
    [stream], counts = render_documents(tok, docs, max_length=64, cross_document=True)
    assert list(stream.input_ids) == list(apart[0].input_ids) + list(apart[1].input_ids)
    assert counts.trained_tokens == len(stream) - 1 == sum(x.n_target for x in apart) + 1
    # the second document's tokens now see the first: their log-probs are those of the model on the whole stream
    logps, _ = token_logps(model, collate([stream], tok.pad_token_id))
    with torch.no_grad():
        full = model(torch.tensor([stream.input_ids])).logits.log_softmax(-1)[0, :-1]
    expected = full.gather(-1, torch.tensor(stream.input_ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    second_alone = alone[1].logp_sum
    assert not torch.allclose(logps[len(apart[0]):].sum(), second_alone, atol=1e-4)


def test_cpt_items_are_the_windows_and_the_counts_match_them(tok):
    from tunesmith.methods import get_method

    docs = [doc("hello world " * 10, 1), doc("the lazy dog " * 10, 2), doc("fox", 3)]
    for cross in (False, True):
        renderer = Renderer(tok, max_length=12, window_overlap=2, cross_document=cross)
        method = get_method("cpt")
        items, note = method.prepare([method.render(renderer, d) for d in docs], 4, "train")
        expected, counts = render_documents(tok, docs, 12, 2, cross)
        assert items == expected and note is None
        stats = renderer.stats.as_dict()
        assert (stats["documents"], stats["windows"], stats["tokens"], stats["trained_tokens"]) == \
            (3, counts.windows, counts.tokens, counts.trained_tokens)
        assert stats["trained_tokens"] == sum(x.n_target for x in items)


def test_long_stream_windows_name_the_document_their_targets_come_from(tok):
    docs = [doc("hello world " * 10, 1), doc("the lazy dog " * 10, 2), doc("fox", 3)]
    items, _ = render_documents(tok, docs, max_length=12, overlap=2, cross_document=True)
    lengths = [len(document_ids(tok, d.text, end_of_text_id(tok), False)) for d in docs]
    ends = [sum(lengths[:k + 1]) for k in range(3)]
    for item, (_, _, first) in zip(items, windows(ends[-1], 12, 2), strict=True):
        owner = next(k for k, end in enumerate(ends) if first < end) + 1
        assert item.source == Source("docs.jsonl", owner)


# --- data check and data preview ----------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PARAGRAPHS = [
    "The printing press made books cheaper and spread literacy across Europe in the fifteenth century.",
    "Tides are caused mainly by the gravitational pull of the moon and, to a lesser degree, the sun.",
    "Bread rises because yeast ferments sugars and releases carbon dioxide that the gluten network traps.",
    "Ferns reproduce with spores rather than seeds and were among the first plants with true roots.",
    "Mechanical clocks appeared in European towers in the thirteenth century, driven by falling weights.",
    "Stars shine because nuclear fusion in their cores turns hydrogen into helium and releases energy.",
    "Rivers carve valleys over millions of years, carrying sediment from mountains down to the sea.",
    "Salt was so valuable in antiquity that it was traded over long distances and used to pay soldiers.",
]
FOOTER = "Copyright 2024 Example Docs. All rights reserved. Visit example.org for more."


def test_data_check_finds_duplicate_documents_boilerplate_and_leakage(tmp_path, tok):
    texts = [f"{p}\n{FOOTER}\n" for p in PARAGRAPHS]
    near = texts[1].replace("mainly", "chiefly")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts + [texts[0], near]])
    held = [texts[2], PARAGRAPHS[3].replace("spores", "tiny spores") + "\n" + FOOTER,
            f"Unrelated: {texts[4]} Also new words here and there about something else.",
            "A fresh document about volcanoes, which form where magma reaches the surface through the crust."]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in held])
    report = check_data(train, tokenizer=tok, max_length=16, eval_spec=eval_path)
    found = {f.code: f for f in report.findings}
    assert (report.kind, report.format, report.examples) == ("document", "text", 10)
    assert found["exact_duplicates"].rows == [f"{train}:1 = {train}:9"]
    assert found["near_duplicates"].rows == [f"{train}:2 ~ {train}:10"]
    assert found["boilerplate"].rows == [f"10 documents: {FOOTER.lower()!r}"]
    assert found["leakage"].level == "error" and found["leakage"].rows == [f"{eval_path}:1 = {train}:3"]
    assert found["near_leakage"].rows == [f"{eval_path}:2 ~ {train}:4"]
    # a copied sentence inside a new document (the copies above are reported once, as leakage)
    [row] = found["passage_leakage"].rows
    assert row.startswith(f"{eval_path}:3: ") and row.endswith("% of its 13-word runs occur in training")
    assert report.documents["documents"] == 10 and report.documents["windows"] > 10
    assert report.lengths.count == 10
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"text": p} for p in PARAGRAPHS])
    assert check_data(clean, tokenizer=tok).findings == []


def test_data_preview_shows_windows_with_overlap_as_context(tmp_path, tiny_dir, capsys):
    from tunesmith.cli import main

    path = tmp_path / "doc.txt"
    path.write_text("hello world how are you today " * 8)
    assert main(["data", "preview", str(path), "--model", str(tiny_dir), "--max-length", "24",
                 "--window-overlap", "4"]) == 0
    out = capsys.readouterr().out
    n = len(windows(len(document_ids(tok_of(tiny_dir), path.read_text(), 0, False)), 24, 4))
    assert f"--- {path}:1 window 1/{n} ---" in out and f"window 3/{n}" in out and f"window 4/{n}" not in out
    first, second = out.split("--- ")[1:3]
    assert first.splitlines()[1].startswith("hello[[")  # the first token has nothing before it
    assert "<|endoftext|>" not in first and "24 tokens, 23 trained" in first
    assert "24 tokens, 20 trained" in second  # 4 tokens of overlap are context


def tok_of(path):
    return AutoTokenizer.from_pretrained(path)


def test_check_data_from_the_python_api(tmp_path, tiny_dir):
    import tunesmith

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "hello world " * 30}) + "\n")
    report = tunesmith.check_data(str(path), str(tiny_dir), max_length=16, window_overlap=2)
    assert report.kind == "document" and report.documents["windows"] > 1 and not report.errors
