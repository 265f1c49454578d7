from twisted.application.reactors import Reactor

nestproto = Reactor(
    "nestproto",
    "nestproto.reactor",
    "epoll(7), at most 250 ready connections a pass (nestproto's).",
)
