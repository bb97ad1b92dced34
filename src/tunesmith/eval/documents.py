"""The comparison eval on raw documents (continued pre-training): every candidate scores every held-out document
by its mean negative log-likelihood per token, the documents cut into windows exactly as training cuts them
(data/documents.py), here of WINDOW tokens with OVERLAP tokens of context repeated from the window before (so
the first tokens of a later window are not scored without context). Every candidate sees the same windows, and
the comparison is paired over documents. Generation, few-shot prompts and the judge do not apply."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.console import Console

from ..data.batching import collate
from ..data.documents import render_documents
from ..data.types import Document, Example
from ..errors import TunesmithError
from ..methods.logps import sequence_logps
from .candidates import Candidate
from .metrics import parse_metric
from .metrics_extra import perplexities
from .report import build_results
from .stats import compare, format_aggregate

WINDOW = 1024
OVERLAP = 256
SHOWN_CHARS = 200


def is_documents(examples: Sequence[Example]) -> bool:
    return bool(examples) and isinstance(examples[0], Document)


def window_length(model: torch.nn.Module) -> int:
    """WINDOW, or the model's context length when that is shorter."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(WINDOW, int(limit)) if isinstance(limit, int) and limit > 0 else WINDOW


@torch.no_grad()
def document_nll(engine, candidate: Candidate, docs: Sequence[Document]) -> tuple[list[float], list[int]]:
    """Each document's mean NLL (nats per scored token) under `candidate`, and how many tokens were scored."""
    model, tokenizer = engine.scoring_model(candidate)
    length = window_length(model)
    owners, items = [], []
    for i, doc in enumerate(docs):
        windows, _ = render_documents(tokenizer, [doc], length, min(OVERLAP, length // 4))
        items += windows
        owners += [i] * len(windows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = torch.zeros(len(docs), dtype=torch.float64), torch.zeros(len(docs), dtype=torch.float64)
    order = sorted(range(len(items)), key=lambda k: -len(items[k]))
    model.eval()
    for k in range(0, len(order), engine.batch_size):
        chunk = order[k:k + engine.batch_size]
        batch = collate([items[j] for j in chunk], pad, pack_length=length).to(engine.rt.device)
        with engine.rt.autocast():
            out = sequence_logps(model, batch)
        for row, j in enumerate(chunk):
            total[owners[j]] -= float(out.logp_sum[row])
            count[owners[j]] += float(out.n_tokens[row])
    return (total / count.clamp(min=1)).tolist(), count.long().tolist()


def check_documents_eval(name: str, metric_specs: Sequence[str], cands: Sequence[Candidate], judge) -> None:
    """Documents are scored by a local model's log-probs: no generation metric, prompted candidate or judge."""
    metrics = [parse_metric(spec) for spec in metric_specs]
    wrong = [spec for spec, m in zip(metric_specs, metrics, strict=True) if not m.needs_logprobs]
    if wrong:
        raise TunesmithError(f"the {name} data are documents, which have no answers to generate: metric(s) "
                             f"{', '.join(wrong)} cannot score them", "use --metric perplexity (or loss)")
    prompted = [c.name for c in cands if not c.local or c.fewshot or c.rag or c.docs or c.labels or c.prompt_file]
    if prompted or judge is not None:
        what = f"candidate(s) {', '.join(prompted)}" if prompted else "a judge"
        raise TunesmithError(f"the {name} data are documents: few-shot candidates and a judge do not apply "
                             f"({what}); documents are scored by a local model's log-probs",
                             "compare base and the tuned run(s) with --metric perplexity")


def compare_documents(name: str, engine, docs: Sequence[Document], cands: Sequence[Candidate],
                      metric_specs: Sequence[str], judge, console: Console):
    from .run import SetResult, candidate_pairs

    check_documents_eval(name, metric_specs, cands, judge)
    metrics = [parse_metric(spec) for spec in metric_specs]
    nll, tokens = {}, []
    for c in cands:
        console.print(f"[dim]{name}: scoring {len(docs)} documents with {c.name}[/dim]")
        nll[c.name], tokens = document_nll(engine, c, docs)
    scores = {m.name: {c: [m.score_nll(x) for x in values] for c, values in nll.items()} for m in metrics}
    tuned = [c.name for c in cands if c.tuned]
    baselines = [c.name for c in cands if not c.tuned]
    comparisons = [compare(scores[m.name], tuned, baselines, m, pairs=candidate_pairs(cands)) for m in metrics]
    examples = [{"prompt": f"{d.source or 'document'}: {d.text[:SHOWN_CHARS]}", "reference": ""} for d in docs]
    results = build_results(examples, [c.name for c in cands], scores, {})
    results.update({"set": name, "comparisons": [c.to_dict() for c in comparisons], "fewshot": {}, "judge": [],
                    "documents": {"scored_tokens": tokens, "window": window_length(engine.model)},
                    "perplexity": {c.metric: perplexities(c.aggregates) for c in comparisons}})
    for c in comparisons:
        for cand, p in perplexities(c.aggregates).items():
            console.print(f"{name}: {cand} perplexity {p['perplexity']:.3f} (95% CI {p['lo']:.3f} … {p['hi']:.3f}), "
                          f"{format_aggregate(c.aggregates[cand], c.unit)}", soft_wrap=True, highlight=False)
    return SetResult(name, [c.name for c in cands], tuned, baselines, comparisons, {}, results)
