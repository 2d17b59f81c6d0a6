"""The console's authorizer in a cluster: the API server decides who sees and steers runs.

The console trusts the user and groups an authenticating proxy puts in its headers
(observe/web/access.py `Identity`); what they may do is Kubernetes RBAC's call, as for
kubectl: before showing a namespace's runs or acting in it, the console posts a
SubjectAccessReview (authorization.k8s.io/v1) for exactly that user and those groups
and the permission (`Permission`: verb, resource, namespace), and follows the answer.
The operator's ServiceAccount needs `create` on `subjectaccessreviews` (the chart's
ClusterRole has it when the console reads a user header).

Answers are cached briefly per (user, groups, permission): a page's live fragment asks
every 1.5 s and the runs list asks once per namespace, which would otherwise be a review
per request; a revoked RoleBinding takes effect within `ttl` seconds, like the API
server's own webhook-authorizer cache. Refusals are cached as long as grants. A review
that fails (API unreachable, the operator lacking the permission) raises and is not
cached: the console then refuses.

No library does this: the official client's AuthorizationV1Api is blocking (the console
serves from the engine's event loop) and has no cache; it is one POST through KubeApi.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ..observe.web.access import Permission
from .api import KubeApi, path_of

SUBJECT_ACCESS_REVIEWS = path_of("authorization.k8s.io/v1", "subjectaccessreviews")

Key = tuple[str, tuple[str, ...], Permission]


def review_body(user: str, groups: Sequence[str], permission: Permission) -> dict[str, Any]:
    """The SubjectAccessReview asking whether `user` in `groups` holds `permission`."""
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": list(groups),
            "resourceAttributes": {
                "group": permission.group,
                "resource": permission.resource,
                "verb": permission.verb,
                "namespace": permission.namespace,
            },
        },
    }


class AccessReviews:
    """An `Authorizer` (observe/web/access.py) answered by SubjectAccessReviews, cached."""

    def __init__(
        self,
        api: KubeApi,
        *,
        ttl: float = 15.0,
        size: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.ttl = ttl
        """Seconds an answer is reused: how long a granted or revoked Role takes to show."""
        self.size = size
        """Answers kept (least recently used dropped): bounded whatever the users send."""
        self.clock = clock
        self.reviews = 0
        """Reviews posted (not answered from the cache), for tests and metrics."""
        self._answers: OrderedDict[Key, tuple[float, bool]] = OrderedDict()

    async def __call__(self, user: str, groups: tuple[str, ...], permission: Permission) -> bool:
        key = (user, tuple(sorted(set(groups))), permission)
        now = self.clock()
        cached = self._answers.get(key)
        if cached is not None and now < cached[0]:
            self._answers.move_to_end(key)
            return cached[1]
        answer = await self.api.create(SUBJECT_ACCESS_REVIEWS, review_body(user, groups, permission))
        self.reviews += 1
        status = answer.get("status") or {}
        allowed = bool(status.get("allowed")) and not status.get("denied")
        self._answers[key] = (now + self.ttl, allowed)
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
        return allowed
