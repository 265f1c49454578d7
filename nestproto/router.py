# -*- test-case-name: tests.test_router -*-
"""
One router per port: every request passes the port's gate and every error
is answered by the one mapping of L{nestproto.errors.refusal}, so no route
can forget either.

The owner of a L{Router} (the API class whose ClassVar it is) provides
L{IGate}. Its C{enter} runs before routing, for every request, even one
that matches no route; its C{admit} runs after routing, before the handler
of every route, and learns which route it is.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field, frozen
from klein import Klein
from klein.resource import KleinResource
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import Interface, implementer

from .debuglog import SwitchedLogger
from .errors import BadURL, ErrorShape, NestError, refusal
from .httpjson import jsonResponse
from .resource import CycleFreeKleinResource

#: What a redacted path secret is logged as.
REDACTED_SECRET = b"redacted"


@frozen
class Route:
    """
    The route a request matched, as its gate sees it.

    @ivar endpoint: the handler's name.
    @ivar public: the route declared itself public (L{Router.public}).
    @ivar pathSecret: the secret the request's path carried under the
        router's secret prefix (C{/k/<secret>/...}), or C{None}.
    """

    endpoint: str
    public: bool = False
    pathSecret: bytes | None = None


class IGate(Interface):
    """Who may use a port's routes, and how; provided by a router's owner."""

    def enter(request: IRequest) -> bytes | None:
        """
        Called for every request before routing. May set headers, refuse by
        raising a L{NestError}, or answer at once by returning a body.
        """

    def admit(request: IRequest, route: Route) -> None:
        """
        Called before the handler of every route.

        @raise NestError: when the request may not use C{route}.
        """


@implementer(IGate)
class OpenGate:
    """A gate that lets every request through: for ports with no policy."""

    def enter(self, request: IRequest) -> bytes | None:
        return None

    def admit(self, request: IRequest, route: Route) -> None:
        return None


@define
class _RouterConfig:
    shape: ErrorShape = ErrorShape.DEVICE
    secretPrefix: bytes | None = None
    publicEndpoints: set[str] = field(factory=set)


class Router(Klein):
    """
    A Klein app whose every answer is JSON, whose every route passes its
    owner's L{IGate}, and whose every error is rendered by
    L{nestproto.errors.refusal} in the port's L{ErrorShape}.

    Its resource answers a URL that is not UTF-8 with a JSON 400: Klein
    itself answers it with a text body and logs an error, before any error
    handler can run. Its routes do not merge repeated slashes: werkzeug
    answers C{/nest//entry} with a 308 that, rendered as JSON, carries no
    C{Location} and so leads nowhere; such a path is simply not found.

    @ivar secretPrefix: when set (C{b"k"}), every route is also served under
        C{/<secretPrefix>/<secret>/...}; the secret is handed to the gate
        (L{Route.pathSecret}) and never logged.
    """

    log = SwitchedLogger()
    #: The owner's gate, once asked (L{gate}).
    _gate: IGate | None = None

    def __init__(
        self,
        shape: ErrorShape = ErrorShape.DEVICE,
        secretPrefix: bytes | None = None,
    ) -> None:
        super().__init__()
        self.url_map.merge_slashes = False
        self._config = _RouterConfig(shape, secretPrefix)
        # One handler for everything (routing errors, refusals and bugs):
        # execute_error_handler renders them all.
        self.handle_errors(Exception)(_renderError)

    def __get__(self, instance: Any, owner: object) -> Router:
        bound = super().__get__(instance, owner)
        assert isinstance(bound, Router)
        bound._config = self._config
        return bound

    @property
    def shape(self) -> ErrorShape:
        """The error body this port's clients read."""
        return self._config.shape

    def public(self, handler: Any) -> Any:
        """
        Mark a route handler public: its gate is told so (L{Route.public})
        and may let it in without credentials.
        """
        self._config.publicEndpoints.add(handler.__name__)
        return handler

    def isPublic(self, endpoint: str) -> bool:
        """Whether the route C{endpoint} was marked L{public}."""
        return endpoint in self._config.publicEndpoints

    def gate(self) -> IGate:
        """
        The owner's gate.

        @raise TypeError: when the router is not bound to an owner that
            provides L{IGate}.
        """
        # Asked twice per request; a bound router's owner never changes.
        if self._gate is None:
            self._gate = IGate(self._instance)
        return self._gate

    def execute_endpoint(
        self, endpoint: str, request: IRequest, *args: Any, **kwargs: Any
    ) -> Any:
        self.gate().admit(
            request,
            Route(endpoint, self.isPublic(endpoint), self._pathSecret(request)),
        )
        return super().execute_endpoint(endpoint, request, *args, **kwargs)

    def execute_error_handler(
        self, handler: Any, request: IRequest, failure: Failure
    ) -> Any:
        return self.renderError(request, failure)

    def renderError(self, request: IRequest, failure: Failure) -> bytes:
        """Answer C{failure} as the port's clients read errors."""
        error = failure.value
        assert error is not None
        answer = refusal(error, self.shape)
        if answer.status >= 500 and not isinstance(error, NestError):
            self.log.failure(
                "error handling {path}", failure, path=self.loggablePath(request)
            )
        else:
            self.log.debug(
                "refused {path}: {code}",
                path=self.loggablePath(request),
                code=answer.document["code"],
            )
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        return jsonResponse(request, answer.document, answer.status)

    def loggablePath(self, request: IRequest) -> str:
        """C{request}'s path with a path secret replaced."""
        prefix = self._config.secretPrefix
        path: bytes = request.path
        if prefix is not None and path.startswith(b"/" + prefix + b"/"):
            segments = path.split(b"/")
            segments[2] = REDACTED_SECRET
            path = b"/".join(segments)
        return path.decode("latin-1")

    def resource(self) -> KleinResource:
        return _RouterResource(self)

    def _enterSecret(self, request: IRequest) -> None:
        """Take C{/<prefix>/<secret>} off the path the routes match."""
        prefix = self._config.secretPrefix
        postpath = request.postpath
        if prefix is not None and len(postpath) >= 2 and postpath[0] == prefix:
            request.prepath.extend(postpath[:2])
            del postpath[:2]

    def _pathSecret(self, request: IRequest) -> bytes | None:
        prefix = self._config.secretPrefix
        prepath = request.prepath
        if prefix is not None and len(prepath) >= 2 and prepath[0] == prefix:
            secret: bytes = prepath[1]
            return secret
        return None


def _renderError(request: IRequest, failure: Failure) -> bytes:
    # Never called: Router.execute_error_handler renders every error.
    raise NotImplementedError()


class _RouterResource(CycleFreeKleinResource):
    """
    A router's resource: checks that the URL is UTF-8, takes the path
    secret off, runs the gate's C{enter}, then routes without Klein's
    per-request reference cycle (L{CycleFreeKleinResource}).
    """

    def __init__(self, router: Router) -> None:
        super().__init__(router)
        self._router = router

    def render(self, request: IRequest) -> Any:
        router = self._router
        try:
            try:
                request.getRequestHostname().decode("utf-8")
                b"/".join(request.prepath + request.postpath).decode("utf-8")
            except UnicodeDecodeError:
                raise BadURL() from None
            router._enterSecret(request)
            early = router.gate().enter(request)
        except Exception:
            return router.renderError(request, Failure())
        if early is not None:
            return early
        return super().render(request)
