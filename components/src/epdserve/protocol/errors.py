"""The one error type that crosses component boundaries, mapped to OpenAI error JSON."""

from __future__ import annotations

from epdserve.protocol import epdserve_pb2 as pb

_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}


class EpdError(Exception):
    """A request failure with the HTTP status the frontend answers with.

    Raise it anywhere a request can fail for a reason the client should see; the request
    plane carries it across processes as an `Error` frame.
    """

    def __init__(self, code: int, message: str, param: str = "", type: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(code, "InternalServerError")

    @classmethod
    def bad_request(cls, message: str, param: str = "") -> EpdError:
        return cls(400, message, param)

    def to_proto(self) -> pb.Error:
        return pb.Error(code=self.code, type=self.type, message=self.message, param=self.param)

    @classmethod
    def from_proto(cls, err: pb.Error) -> EpdError:
        return cls(err.code or 500, err.message, err.param, err.type)

    def to_openai(self) -> dict:
        """The body OpenAI clients expect: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param or None, "code": self.code}}
