"""Just enough HTTP/2 (cleartext, prior knowledge) and protobuf, by hand, for gRPC calls from
benches/abuse.py with Python's standard library: unary calls, streams that send and never
finish, and the raw frames of floods no well-behaved client library would send.
"""

import socket
import struct
import threading
import time


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_bytes(field, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_varint(field, n):
    return varint(field << 3) + varint(n)


def read_varint(buf, i):
    n = shift = 0
    while i < len(buf):
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return n, i


def grpc_message(msg):
    return b"\x00" + struct.pack(">I", len(msg)) + msg


DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_int(n, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if n < limit:
        return bytes([first | n])
    out = bytearray([first | limit])
    n -= limit
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    out.append(n)
    return bytes(out)


def hpack(headers):
    """Literal header fields, never indexed, no Huffman: valid HPACK with no table state."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + hpack_int(len(name), 7) + name.encode() + hpack_int(len(value), 7) + value.encode()
    return bytes(out)


class Stream:
    def __init__(self, window):
        self.window = window
        self.data = bytearray()
        self.done = False
        self.reset = False


class H2:
    """One HTTP/2 connection with prior knowledge (h2c): a reader thread answers SETTINGS and
    PING, keeps the flow-control windows and collects each stream's DATA. `recv_window` is the
    window granted to the server; None grants ~1 GiB (and tops it up), a number grants that
    much per stream and never more (a reader that stops reading). `sock`: an unconnected socket
    to use (a plain one by default); `stopping` ends writes waiting for a window."""

    def __init__(self, port, sock=None, recv_window=None, timeout=5, stopping=None):
        self.sock = sock or socket.socket()
        self.stopping = stopping or threading.Event()
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.cv = threading.Condition()
        self.streams = {}
        self.next_id = 1
        self.conn_window = 65535
        self.peer_initial = 65535
        self.max_streams = 100
        self.closed = False
        self.grant = recv_window is None
        initial = (1 << 31) - 1 if self.grant else recv_window
        settings = struct.pack(">HI", 2, 0) + struct.pack(">HI", 4, initial)
        first = PREFACE + frame(SETTINGS, 0, 0, settings)
        if self.grant:
            first += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30))
        self.received = 0
        self.sock.sendall(first)
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, data):
        with self.lock:
            self.sock.sendall(data)

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def _read(self):
        try:
            while True:
                head = self._recv_exact(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._recv_exact(length) if length else b""
                reply = self._on_frame(kind, flags, sid, payload)
                if reply:
                    self.send(reply)
        except (OSError, ConnectionError):
            pass
        with self.cv:
            self.closed = True
            for s in self.streams.values():
                s.done = True
            self.cv.notify_all()

    def _on_frame(self, kind, flags, sid, payload):
        """Applies one frame; returns what to answer (sent once the state is unlocked)."""
        reply = b""
        with self.cv:
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload) - 5, 6):
                    key, value = struct.unpack(">HI", payload[i:i + 6])
                    if key == 4:
                        for s in self.streams.values():
                            s.window += value - self.peer_initial
                        self.peer_initial = value
                    elif key == 3:
                        self.max_streams = min(100, value)
                reply = frame(SETTINGS, ACK, 0)
            elif kind == PING and not flags & ACK:
                reply = frame(PING, ACK, 0, payload)
            elif kind == WINDOW_UPDATE:
                inc = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
                if sid == 0:
                    self.conn_window += inc
                elif sid in self.streams:
                    self.streams[sid].window += inc
            elif kind in (DATA, HEADERS, RST_STREAM) and sid in self.streams:
                s = self.streams[sid]
                if kind == DATA:
                    s.data += payload
                    self.received += len(payload)
                    if self.grant and self.received > 1 << 29:
                        reply = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received))
                        self.received = 0
                if kind == RST_STREAM:
                    s.reset = True
                if kind == RST_STREAM or flags & END_STREAM:
                    s.done = True
            elif kind == GOAWAY:
                self.closed = True
            self.cv.notify_all()
        return reply

    def open(self, path, end=False, timeout=5):
        """Starts a gRPC call on `path`; returns its stream id (waits for a free stream)."""
        headers = hpack([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "kvgate"),
                         ("content-type", "application/grpc"), ("te", "trailers")])
        with self.cv:
            deadline = time.monotonic() + timeout
            while not self.closed and sum(not s.done for s in self.streams.values()) >= self.max_streams:
                if not self.cv.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise TimeoutError("no free stream")
            if self.closed:
                raise ConnectionError("closed")
        # Stream ids must reach the server in increasing order: allocate and send as one.
        with self.lock:
            with self.cv:
                sid = self.next_id
                self.next_id += 2
                self.streams[sid] = Stream(self.peer_initial)
            self.sock.sendall(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, headers))
        return sid

    def write(self, sid, data, end=False, timeout=10):
        """Sends DATA on a stream within the server's windows; False if it could not."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while True:
            with self.cv:
                s = self.streams[sid]
                while not (self.closed or s.done) and (self.conn_window <= 0 or s.window <= 0) and len(view):
                    if self.stopping.is_set() or time.monotonic() > deadline:
                        return False
                    self.cv.wait(0.2)
                if self.closed or s.done:
                    return False
                n = min(len(view), 16384, self.conn_window, s.window)
                self.conn_window -= n
                s.window -= n
            last = n == len(view)
            self.send(frame(DATA, END_STREAM if (end and last) else 0, sid, bytes(view[:n])))
            view = view[n:]
            if last:
                return True

    def call(self, path, msg, timeout=2.0):
        """A unary call: the response's first message, or None (an error status, a reset, a
        timeout)."""
        sid = self.open(path, timeout=timeout)
        self.write(sid, grpc_message(msg), end=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        with self.cv:
            s = self.streams[sid]
            while not s.done and time.monotonic() < deadline:
                self.cv.wait(deadline - time.monotonic())
            del self.streams[sid]
        return bytes(s.data[5:]) if s.done and len(s.data) >= 5 else None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
