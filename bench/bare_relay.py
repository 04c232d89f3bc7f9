"""
Baseline: a bare Twisted relay with no features.

    python bench/bare_relay.py PORT BACKEND_URL [--no-form-parsing]
"""

import sys

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"host",
       b"content-length", b"proxy-connection", b"trailer"}


@implementer(IBodyProducer)
class Body:
    def __init__(self, data):
        self.data, self.length = data, len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    pauseProducing = resumeProducing = stopProducing = lambda self: None


class Pipe(protocol.Protocol):  # stream the upstream body; a slow client pauses upstream
    def __init__(self, request):
        self.request = request

    def connectionMade(self):
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data):
        self.request.write(data)

    def connectionLost(self, reason):
        self.request.unregisterProducer()
        if not self.request._disconnected:
            self.request.finish()


class Relay(resource.Resource):
    isLeaf = True

    def __init__(self, agent, base):
        super().__init__()
        self.agent, self.base, self.host = agent, base, base.split(b"//", 1)[1]

    def render(self, request):
        headers = Headers({k: v for k, v in request.requestHeaders.getAllRawHeaders()
                           if k.lower() not in HOP})
        headers.setRawHeaders(b"host", [self.host])
        data = request.content.read()
        d = self.agent.request(request.method, self.base + request.uri, headers,
                               Body(data) if data else None)
        d.addCallback(self.relay, request)
        d.addErrback(lambda f: request._disconnected or request.finished or (
            request.setResponseCode(502), request.finish()))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return server.NOT_DONE_YET

    def relay(self, response, request):
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP:
                request.responseHeaders.setRawHeaders(name, values)
        if response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % response.length)
        response.deliverBody(Pipe(request))


if __name__ == "__main__":
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost, pool.retryAutomatically = 1024, False
    site = server.Site(Relay(Agent(reactor, pool=pool), sys.argv[2].encode()),
                       parsePOSTFormSubmission="--no-form-parsing" not in sys.argv)
    site.log = lambda request: None
    listen = f"tcp:{sys.argv[1]}:interface=127.0.0.1:backlog=4096"
    endpoint = endpoints.serverFromString(reactor, listen)
    endpoint.listen(site).addErrback(lambda f: (print(f.value, file=sys.stderr), reactor.stop()))
    reactor.run()
