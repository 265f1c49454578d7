# -*- test-case-name: tests.test_resource,tests.test_router -*-
"""
A Klein resource that leaves no reference cycle behind per request.

Klein's own C{KleinResource.render} (klein 24.8.0) defines its error
handling as a closure that calls itself by name, so the closure refers to
itself through its cell, and through another cell to the request: every
request, with its transport, headers and buffers (42 objects), ends in a
reference cycle that only the cyclic collector frees, usually after it
reached the oldest generation. With 20,000 held subscribes that is 840,000
objects of garbage once they disconnect, and a 1.3 s full collection
(bench/README.rst, issue 10). L{CycleFreeKleinResource} takes the same
steps with module functions and methods, which refer to nothing per
request, so reference counting frees each request once it is answered or
its client left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException

from .errors import BadURL

#: How many route matches a resource keeps.
_ROUTES_KEPT = 512
#: Klein's error handlers: the exceptions each one takes, and the handler.
_ErrorHandlers = Sequence[tuple[Sequence[type[Exception]], Any]]


def _urlParts(request: IRequest) -> tuple[str, str]:
    """
    The script name and path of C{request}, as Klein routes them.

    @raise UnicodeDecodeError: when one of them, or the host, is not UTF-8.
    """
    request.getRequestHostname().decode("utf-8")
    # As Klein's extractURLparts: a non-empty list of segments is a path
    # starting with a slash, even when its one segment is empty (C{/}).
    script = b"/".join(request.prepath).decode("utf-8")
    path = b"/".join(request.postpath).decode("utf-8")
    return (
        _rooted(script) if request.prepath else "",
        _rooted(path) if request.postpath else "",
    )


def _urlHost(request: IRequest) -> str:
    """C{request}'s host as Klein routes it: with its port unless the default."""
    host: str = request.getRequestHostname().decode("utf-8")
    port = getattr(request.getHost(), "port", 0)
    if (request.isSecure(), port) not in {
        (True, 443),
        (False, 80),
        (False, 0),
        (True, 0),
    }:
        host = f"{host}:{port}"
    return host


def _rooted(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def _over(result: object, finished: list[bool], pending: list[Deferred[Any]]) -> None:
    """
    The request is over: answered, or its client left, in which case the
    handler's unfinished work (a held subscribe) is cancelled.
    """
    finished.append(True)
    if isinstance(result, Failure) and pending:
        pending.pop().cancel()


def _body(result: object) -> bytes | None:
    if result is None or isinstance(result, bytes):
        return result
    if isinstance(result, str):
        return result.encode("utf-8")
    raise TypeError(f"a Klein handler answered {type(result).__name__}")


class CycleFreeKleinResource(KleinResource):
    """
    Routes and answers requests as Klein's resource does, for what Klein
    handlers return (bytes, or a Deferred or coroutine of bytes; C{str}
    goes out as UTF-8, C{None} as an empty body), with the app's error
    handlers (C{handle_errors}, run through the app's
    C{execute_error_handler}), but leaves no reference cycle behind (see
    the module's docstring). Klein's C{IKleinRequest} (C{url_for}) and
    C{branch} routes are not supported: nestproto uses neither.

    A URL that is not UTF-8 is a L{BadURL} for the app's error handlers.
    """

    log = Logger()

    def __init__(self, app: Klein) -> None:
        super().__init__(app)
        #: werkzeug's match of each (method, script, path) seen lately: the
        #: routes are fixed once the app's module is imported, and matching
        #: was a tenth of the instructions of a request (bench/README.rst).
        #: Refusals (404, 405) are not kept.
        self._routes: dict[tuple[bytes, str, str], tuple[str, Mapping[str, Any]]] = {}

    def render(self, request: IRequest) -> Any:
        # Set once the request is over: nothing is written after that.
        finished: list[bool] = []
        # The answer while it is pending. The request and the answer refer
        # to each other through it only until the request finishes or its
        # connection is lost, which fires notifyFinish and drops it.
        pending: list[Deferred[Any]] = []
        cast(Request, request).notifyFinish().addBoth(_over, finished, pending)
        answer = maybeDeferred(self._route, request)
        if not finished:
            pending.append(answer)
        handlers = self._app._error_handlers
        # One step for either outcome: every callback a held answer carries
        # is kept (with its arguments) for as long as it is held.
        answer.addCallbacks(
            self._answer,
            self._failed,
            callbackArgs=(request, finished, handlers),
            errbackArgs=(request, finished, handlers),
        )
        return NOT_DONE_YET

    def _route(self, request: IRequest) -> Any:
        """
        Call the handler of the route C{request} matches.

        @raise HTTPException: when none matches (404, 405).
        @raise BadURL: when its host or path is not UTF-8.
        """
        try:
            script, path = _urlParts(request)
        except UnicodeDecodeError:
            raise BadURL() from None
        key = (request.method, script, path)
        found = self._routes.get(key)
        if found is None:
            # The host is only for werkzeug's binding: no route here names one.
            mapper = self._app.url_map.bind(
                _urlHost(request),
                script,
                path_info=path,
                default_method=request.method.decode("utf-8"),
                url_scheme="https" if request.isSecure() else "http",
            )
            rule, arguments = mapper.match(return_rule=True)
            if len(self._routes) >= _ROUTES_KEPT:
                # Paths naming a serial are many; the hot ones come back.
                self._routes.clear()
            found = self._routes[key] = (str(rule.endpoint), arguments)
        endpoint, arguments = found
        # Klein's convention: the route's segments move from postpath to
        # prepath.
        segments = getattr(self._app.endpoints[endpoint], "segment_count", 0)
        request.prepath.extend(request.postpath[:segments])
        request.postpath = request.postpath[segments:]
        return self._app.execute_endpoint(endpoint, request, **arguments)

    def _answer(
        self,
        result: object,
        request: IRequest,
        finished: list[bool],
        handlers: _ErrorHandlers,
    ) -> Deferred[None] | None:
        """
        Write a handler's answer and finish the request, unless it is over;
        an answer that is not a body is a failure for C{handlers}.
        """
        try:
            body = _body(result)
        except TypeError:
            return self._failed(Failure(), request, finished, handlers)
        if finished:
            return None
        try:
            if body is not None:
                request.write(body)
            request.finish()
        except Exception:
            self.log.failure("error writing the answer to {path}", path=request.path)
        return None

    def _failed(
        self,
        failure: Failure,
        request: IRequest,
        finished: list[bool],
        handlers: _ErrorHandlers,
    ) -> Deferred[None] | None:
        """
        Give C{failure} to the first of C{handlers} that takes it; a failure
        of that handler goes on to the ones after it. As in Klein, a request
        that is over gets nothing, and a failure that no handler takes gets
        werkzeug's answer (an C{HTTPException}) or Twisted's 500.
        """
        if finished:
            if not isinstance(failure.value, CancelledError):
                self.log.failure("error after the request was over", failure)
            return None
        for index, (exceptions, handler) in enumerate(handlers):
            if failure.check(*exceptions):
                rest = handlers[index + 1 :]
                handled: Deferred[Any] = maybeDeferred(
                    self._app.execute_error_handler, handler, request, failure
                )
                return handled.addCallbacks(
                    self._answer,
                    self._failed,
                    callbackArgs=(request, finished, rest),
                    errbackArgs=(request, finished, rest),
                )
        error = failure.value
        if isinstance(error, HTTPException):
            request.setResponseCode(error.code or 500)
            response = error.get_response({})
            for name, value in response.headers:
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
            return self._answer(
                b"".join(response.iter_encoded()), request, finished, ()
            )
        cast(Request, request).processingFailed(failure)
        return None
