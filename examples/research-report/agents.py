"""Agents of the research-report example: `python agents.py <agent>`.

fetcher   fetches one source (from the bundled corpus, standing in for the web); some
          sources are rate-limited and fail their first attempts with RetryableError
analyst   extracts findings from the fetched documents, groups them by theme, drafts
reviewer  checks the draft against editorial rules; a rejection is a FatalError whose
          details list the issues
editor    the fallback when the reviewer rejects: fixes the issues and re-checks
writer    renders the final report in Markdown

The draft travels through the run's context store ("draft"): the analyst writes it, the
editor rewrites it when it had to, and the writer reads whichever is there.
Everything is offline and deterministic unless CADENZA_LLM_BASE_URL is set.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from cadenza import Agent, FatalError, RetryableError, Task
from cadenza.llm import chat as llm_chat

DATA = Path(__file__).resolve().parent / "data"

fetcher = Agent("fetcher")
analyst = Agent("analyst")
reviewer = Agent("reviewer")
editor = Agent("editor")
writer = Agent("writer")


# ------------------------------------------------------------------------ helpers

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NUMBER = re.compile(r"\d")
_STOP_TEXT = """
a an and are as at be by do does for from how in is it its of on or that the their them they this
to was what well which with
"""
STOPWORDS = frozenset(_STOP_TEXT.split())

THEMES: dict[str, tuple[str, tuple[str, ...]]] = {
    # theme: (heading, stems that signal it)
    "performance": (
        "Performance in the cold",
        (
            "cop",
            "coefficient",
            "capacity",
            "temperatur",
            "backup",
            "defrost",
            "comfort",
            "compressor",
            "degc",
        ),
    ),
    "running_cost": ("Running costs", ("bill", "tariff", "paid", "electricity", "oil")),
    "adoption": (
        "What limits adoption",
        ("cost", "install", "rebat", "sal", "barrier", "shortag", "price", "contractor", "requir", "demand"),
    ),
    "grid": ("Grid impact", ("grid", "peak", "feeder", "kw", "load")),
}
THEME_ORDER = tuple(THEMES)


def stems(text: str) -> list[str]:
    out = []
    for raw in _WORD.findall(text.lower().replace("°c", " degc ")):
        if raw in STOPWORDS:
            continue
        word = raw
        for suffix in ("ing", "ers", "er", "ed", "es", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        out.append(word)
    return out


def corpus() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = json.loads((DATA / "corpus.json").read_text())["documents"]
    return docs


def words(text: str) -> int:
    return len(text.split())


# ----------------------------------------------------------------------- fetcher


@fetcher.handler
def fetch_source(task: Task) -> dict[str, Any]:
    source = task.input.get("source")
    doc = corpus().get(str(source))
    if doc is None:
        raise FatalError(f"unknown source {source!r}: not in data/corpus.json")
    # The stand-in for a real rate limit: deterministic, so the example always retries the
    # same sources the same number of times (and the tests can count the retries).
    if task.attempt <= doc.get("rate_limited_attempts", 0):
        task.log.warning("rate limited", source=source, attempt=task.attempt)
        raise RetryableError(f"{doc['publisher']}: HTTP 429 Too Many Requests (attempt {task.attempt})")
    fields = ("title", "publisher", "year", "kind", "credibility", "url", "text")
    return {"id": source, **{k: doc[k] for k in fields}, "fetched_on_attempt": task.attempt}


# ----------------------------------------------------------------------- analyst


def theme_of(sentence: str) -> tuple[str | None, int]:
    found = stems(sentence)
    hits = {
        theme: sum(1 for s in found for signal in signals if s.startswith(signal))
        for theme, (_, signals) in THEMES.items()
    }
    best = max(THEME_ORDER, key=lambda t: (hits[t], -THEME_ORDER.index(t)))
    return (best, hits[best]) if hits[best] else (None, 0)


def extract_findings(
    question: str, documents: list[dict[str, Any]], per_source: int = 3
) -> list[dict[str, Any]]:
    """The sentences of each document that best answer the question, with their theme."""
    asked = set(stems(question))
    findings = []
    for doc in documents:
        scored = []
        for position, sentence in enumerate(_SENTENCE.split(doc["text"].strip())):
            theme, strength = theme_of(sentence)
            if theme is None:
                continue
            overlap = len(asked & set(stems(sentence)))
            score = overlap + strength + (1.5 if _NUMBER.search(sentence) else 0.0)
            scored.append((score, position, theme, sentence))
        best = sorted(scored, key=lambda s: (-s[0], s[1]))[:per_source]
        for score, position, theme, sentence in sorted(best, key=lambda s: s[1]):
            findings.append(
                {
                    "source": doc["id"],
                    "credibility": doc["credibility"],
                    "theme": theme,
                    "claim": sentence,
                    "score": round(score, 2),
                    "position": position,
                }
            )
    for n, finding in enumerate(findings, 1):
        finding["id"] = f"F{n}"
    return findings


def build_draft(task_input: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, Any]:
    findings = extract_findings(task_input["question"], documents)
    sources = [
        {"n": n, **{k: d[k] for k in ("id", "title", "publisher", "year", "url", "credibility", "kind")}}
        for n, d in enumerate(documents, 1)
    ]
    summary = []
    for theme in THEME_ORDER:
        top = max((f for f in findings if f["theme"] == theme), key=lambda f: f["score"], default=None)
        if top is not None:
            summary.append(top["claim"])
    return {
        "title": task_input["topic"],
        "question": task_input["question"],
        "audience": task_input.get("audience", "a general audience"),
        "summary": summary,
        "findings": findings,
        "sources": sources,
        "caveats": [],
        "revisions": [],
    }


def body_words(draft: dict[str, Any]) -> int:
    return (
        sum(words(s) for s in draft["summary"])
        + sum(words(f["claim"]) for f in draft["findings"])
        + sum(words(c) for c in draft["caveats"])
    )


@analyst.handler
async def analyse(task: Task) -> dict[str, Any]:
    documents = task.input.get("documents") or []
    if len(documents) < 2:
        raise FatalError(f"need at least 2 sources to compare, got {len(documents)}")
    draft = build_draft(task.input, documents)
    summary = llm_chat(
        f"You write research briefs for {draft['audience']}. Summarise the findings in at most four "
        "sentences, one per theme. Use only the facts given.",
        "\n".join(f"- ({f['theme']}) {f['claim']}" for f in draft["findings"]),
        timeout=60.0,
    )
    if summary:
        draft["summary"] = [s for s in _SENTENCE.split(summary) if s]
    await task.context.put("draft", draft)
    themes = {t: sum(1 for f in draft["findings"] if f["theme"] == t) for t in THEME_ORDER}
    task.log.info("draft written", findings=len(draft["findings"]), words=body_words(draft))
    return {
        "findings": len(draft["findings"]),
        "themes": themes,
        "words": body_words(draft),
        "sources": len(documents),
    }


# ---------------------------------------------------------------------- reviewer


def review(draft: dict[str, Any], max_words: int, min_sources: int = 3) -> list[dict[str, Any]]:
    """Editorial rules; the list of what breaks them (empty when the draft may be published)."""
    issues: list[dict[str, Any]] = []
    by_id = {s["id"]: s for s in draft["sources"]}
    for f in draft["findings"]:
        publisher = by_id[f["source"]]["publisher"]
        if by_id[f["source"]]["credibility"] == "low":
            issues.append(
                {
                    "code": "low_credibility",
                    "finding": f["id"],
                    "source": f["source"],
                    "detail": f"{f['id']} rests on {publisher}, a low-credibility source",
                }
            )
    cited_high = {f["source"] for f in draft["findings"] if by_id[f["source"]]["credibility"] == "high"}
    if len(cited_high) < min_sources:
        issues.append(
            {
                "code": "too_few_sources",
                "detail": f"{len(cited_high)} high-credibility sources cited, {min_sources} needed",
            }
        )
    for theme in THEME_ORDER:
        if not any(
            f["theme"] == theme and by_id[f["source"]]["credibility"] != "low" for f in draft["findings"]
        ):
            issues.append(
                {
                    "code": "uncovered_theme",
                    "theme": theme,
                    "detail": f"no credible finding about {THEMES[theme][0].lower()}",
                }
            )
    if body_words(draft) > max_words:
        issues.append({"code": "too_long", "detail": f"{body_words(draft)} words, at most {max_words}"})
    return issues


@reviewer.handler
async def validate_draft(task: Task) -> dict[str, Any]:
    draft = await task.context.get("draft")
    if draft is None:
        raise FatalError("no draft in the run's context")
    issues = review(draft, int(task.input.get("max_words", 600)))
    if issues:
        # A rejection is final for this step (no retry would change the verdict): the
        # workflow's onFailure sends the draft to the editor instead.
        raise FatalError(
            f"draft rejected: {'; '.join(i['detail'] for i in issues)}", details={"issues": issues}
        )
    return {"approved": True, "words": body_words(draft), "findings": len(draft["findings"])}


# ------------------------------------------------------------------------ editor


def revise(draft: dict[str, Any], issues: list[dict[str, Any]], max_words: int) -> dict[str, Any]:
    draft = json.loads(json.dumps(draft))
    by_id = {s["id"]: s for s in draft["sources"]}
    changes: list[str] = []
    weak = {i["finding"] for i in issues if i["code"] == "low_credibility"}
    if weak:
        moved = [f for f in draft["findings"] if f["id"] in weak]
        draft["findings"] = [f for f in draft["findings"] if f["id"] not in weak]
        draft["summary"] = [s for s in draft["summary"] if s not in {f["claim"] for f in moved}]
        for f in moved:
            publisher = by_id[f["source"]]["publisher"]
            draft["caveats"].append(f'Anecdotal, unverified: "{f["claim"]}" ({publisher}; not corroborated).')
        changes.append(
            f"moved {len(moved)} low-credibility claim(s) to the caveats: {', '.join(sorted(weak))}"
        )
    while body_words(draft) > max_words:
        # Drop the weakest finding of the theme with the most findings, never a theme's last.
        counts = {t: [f for f in draft["findings"] if f["theme"] == t] for t in THEME_ORDER}
        theme = max(THEME_ORDER, key=lambda t: (len(counts[t]), -THEME_ORDER.index(t)))
        if len(counts[theme]) <= 1:
            break
        weakest = min(counts[theme], key=lambda f: (f["score"], -f["position"]))
        draft["findings"].remove(weakest)
        changes.append(f"cut {weakest['id']} ({theme}) for length")
    remaining = review(draft, max_words)
    if remaining:
        raise FatalError(
            f"revision still breaks the rules: {'; '.join(i['detail'] for i in remaining)}",
            details={"issues": remaining},
        )
    draft["revisions"] = changes
    return draft


@editor.handler
async def revise_draft(task: Task) -> dict[str, Any]:
    draft = await task.context.get("draft")
    if draft is None:
        raise FatalError("no draft in the run's context")
    rejection = task.input.get("rejection") or {}
    issues = (rejection.get("details") or {}).get("issues") or []
    revised = revise(draft, issues, int(task.input.get("max_words", 600)))
    await task.context.put("draft", revised)
    task.log.info("draft revised", changes=revised["revisions"])
    return {
        "changes": revised["revisions"],
        "words": body_words(revised),
        "findings": len(revised["findings"]),
    }


# ------------------------------------------------------------------------ writer


def render(draft: dict[str, Any]) -> str:
    number = {s["id"]: s["n"] for s in draft["sources"]}
    cited = sorted({number[f["source"]] for f in draft["findings"]})
    renumber = {n: i for i, n in enumerate(cited, 1)}
    lines = [
        f"# {draft['title']}",
        "",
        f"*A research brief for {draft['audience']}.* {draft['question']}",
        "",
        "## Summary",
        "",
    ]
    lines += [" ".join(draft["summary"]), ""]
    for theme in THEME_ORDER:
        found = [f for f in draft["findings"] if f["theme"] == theme]
        if not found:
            continue
        lines += [f"## {THEMES[theme][0]}", ""]
        lines += [f"- {f['claim']} [{renumber[number[f['source']]]}]" for f in found]
        lines.append("")
    if draft["caveats"]:
        lines += ["## Caveats", ""] + [f"- {c}" for c in draft["caveats"]] + [""]
    lines += ["## Sources", ""]
    for source in draft["sources"]:
        if source["n"] in renumber:
            lines.append(
                f"{renumber[source['n']]}. {source['publisher']} ({source['year']}). "
                f"*{source['title']}*. {source['url']}"
            )
    if draft["revisions"]:
        lines += ["", "---", "", "Editorial revisions: " + "; ".join(draft["revisions"]) + "."]
    return "\n".join(lines) + "\n"


@writer.handler
async def write_report(task: Task) -> dict[str, Any]:
    draft = await task.context.get("draft")
    if draft is None:
        raise FatalError("no draft in the run's context")
    markdown = render(draft)
    return {
        "title": draft["title"],
        "markdown": markdown,
        "words": words(markdown),
        "sources_cited": len({f["source"] for f in draft["findings"]}),
        "findings": len(draft["findings"]),
        "caveats": len(draft["caveats"]),
        "revised": bool(draft["revisions"]),
    }


AGENTS = {a.name: a for a in (fetcher, analyst, reviewer, editor, writer)}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in AGENTS:
        sys.exit(f"usage: python agents.py {{{'|'.join(AGENTS)}}}")
    AGENTS[sys.argv[1]].run()
