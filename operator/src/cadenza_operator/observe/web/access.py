"""Who may act in the console, and from where.

Identity: the console has no login of its own. In the operator it trusts the header an
authenticating proxy in front of it sets (oauth2-proxy's `X-Forwarded-User`, or whatever
`console.auth.userHeader` names) and only when that is configured; the header's user is
then the verified `by` of every action, checked by the engine like any approver. Without
it, actions carry `console`, an unverified display name: cancel, resume and signals go
through (whoever reaches the Service may steer runs, which is why the chart leaves the
console off), and an approval whose step names approvers is refused by the engine, since
`console` is none of them. `cadenza dev` acts as the local user. With a groups header
too (oauth2-proxy's `X-Forwarded-Groups`), an approval naming `group:NAME` accepts a
member: the console vouches for the group as the operator does after Kubernetes admission
(`USER [group:NAME]`, engine/decide/events.py `is_approver`); a NATS client cannot.

Cross-site requests: every POST must come from the console's own pages. Browsers say where
a request comes from (`Sec-Fetch-Site`, else `Origin`); a form on another site posting to
the console is refused before anything is done, so a page a user visits cannot approve or
cancel in their name. A request saying neither (not a browser) is refused too.

Authorization (who may see and steer which namespace's runs): in a cluster the console
asks the API server, as Kubernetes tools do, whether the header's user and groups may
`get`/`list` WorkflowRuns in a namespace (to see its runs) or `update` them (to approve,
reject, signal, cancel, resume or retry there): `Permission`, answered by an `Authorizer`
the operator hands in (kube/access.py: SubjectAccessReviews, cached briefly). `update`
because that is what steering a run through kubectl takes (approvals and cancellations
are patches of the WorkflowRun): the console grants no one more than kubectl would.
Without an authorizer (`cadenza dev`, or no user header) nothing is checked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ...models import API_GROUP

UNVERIFIED = "console"
"""The `by` of actions when no identity is known: a display name, never an approver."""


@dataclass(frozen=True)
class Identity:
    """Where the console takes the viewer's name from: a trusted proxy header, or a fixed
    user (`cadenza dev`: the local user), else nobody (`console`, unverified)."""

    user_header: str | None = None
    groups_header: str | None = None
    """The proxy's header of the user's groups, comma-separated (oauth2-proxy:
    X-Forwarded-Groups); read only with `user_header`."""
    fixed_user: str | None = None

    def viewer(self, request: web.Request) -> tuple[str | None, bool]:
        """(name, verified); name None: the proxy header is configured but missing, so
        nobody may act (a request that bypassed the proxy)."""
        if self.user_header:
            user = request.headers.get(self.user_header, "").strip()
            return (user or None), True
        if self.fixed_user:
            return self.fixed_user, True
        return UNVERIFIED, False

    def groups(self, request: web.Request) -> list[str]:
        """The groups the proxy vouches the viewer is in (none without both headers set)."""
        if not (self.user_header and self.groups_header):
            return []
        raw = request.headers.get(self.groups_header, "")
        return [g.strip() for g in raw.split(",") if g.strip() and "]" not in g]


@dataclass(frozen=True)
class Permission:
    """What the console asks the API server before showing or doing something: `verb` on
    `resource` of `group` in `namespace` (a SubjectAccessReview's resourceAttributes)."""

    verb: str
    namespace: str
    resource: str = "workflowruns"
    group: str = API_GROUP

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}.{self.group} in namespace {self.namespace}"


Authorizer = Callable[[str, tuple[str, ...], Permission], Awaitable[bool]]
"""(user, groups, permission) -> whether the API server allows it. Raises when it cannot
be asked (the console then refuses: it never guesses yes)."""

VIEW = "get"
"""The verb to see one run (its page, its live fragment)."""
LIST = "list"
"""The verb to see a namespace's runs in the list, and its diagnose page."""
ACT = "update"
"""The verb to approve, reject, signal, cancel, resume or retry a run."""


def cross_site_refusal(request: web.Request) -> str | None:
    """Why a POST is refused as not coming from the console's own pages, or None."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return None if site in ("same-origin", "none") else f"cross-site request refused ({site})"
    origin = request.headers.get("Origin")
    if not origin:
        return "request refused: no Origin or Sec-Fetch-Site header (not from the console's pages)"
    parts = urlsplit(origin)
    if parts.netloc != request.host:
        return f"cross-origin request refused (from {origin})"
    return None
