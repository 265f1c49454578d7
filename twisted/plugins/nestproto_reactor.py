from twisted.application.reactors import Reactor

nestproto = Reactor(
    "nestproto",
    "nestproto.reactor",
    "epoll(7), at most 1,000 ready connections a pass (nestproto's).",
)
