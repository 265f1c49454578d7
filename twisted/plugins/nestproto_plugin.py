from twisted.application.service import ServiceMaker

nestproto = ServiceMaker(
    "nestproto", "nestproto.service", "Nest device cloud.", "nestproto"
)
