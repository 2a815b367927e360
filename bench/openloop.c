/* Open-loop load client for bench/dataplane.py, and the trivial HTTP/1.1 app it measures against (built by
 * the bench with gcc into a temporary directory).
 *
 * Request i is due at start + i/rate. Its latency is measured from when it was due, not from when it was
 * sent, so a stalled connection or a client that falls behind shows up in the figures instead of hiding
 * (the "coordinated omission" a closed-loop client has). Timers are CLOCK_MONOTONIC, in nanoseconds.
 *
 *   openloop [-s SPIN_US] h1   HOST PORT AUTHORITY PATH RATE SECONDS CONNS
 *   openloop [-s SPIN_US] grpc HOST PORT AUTHORITY PATH RATE SECONDS CONNS BODYFILE
 *   openloop serve HOST PORT
 *
 * Waiting: the loop sleeps in epoll until the next due time (a timerfd). With -s it sleeps only until
 * SPIN_US before the due time, then polls epoll without sleeping until the request is sent: waking from a
 * timer on this 2-core VM costs ~50 us, and that lateness counts in every latency (measured against
 * `serve` at 1000 rps: p50 97 us sleeping to the due time, 51 us with -s 100, 48-72 us with -s 50; polling
 * all the time, while waiting for responses too, was worse: 64 us). It costs a core only for SPIN_US of
 * each interval; responses are always waited for asleep.
 *
 * h1: GET over HTTP/1.1 keep-alive connections, one request in flight per connection; a due request with
 * no free connection waits (its wait counts in its latency). A response is good when its status is 200.
 * grpc: POST over HTTP/2 with prior knowledge (h2c), content-type application/grpc, te: trailers, BODYFILE
 * as the DATA (a pre-framed unary message); requests are spread over the connections as concurrent
 * streams. A call is good when a message (DATA) arrived before the trailers that end the stream: an error
 * from Envoy on the way is a trailers-only answer. grpc-status itself is not decoded (that needs HPACK with
 * Huffman); the bench proves each path answers OK with a real gRPC client first.
 *
 * Output: one line "openloop n=N errors=E late=L max_lag_us=X" (late: requests sent more than 1 ms after
 * they were due; lag: send time minus due time), then the latency of every good request in nanoseconds,
 * one per line. Percentiles are the bench's job.
 *
 * serve: the app the bench's HTTP/1.1 paths end at, so a measurement is the client, loopback and the
 * sidecars, not a third Envoy. One thread, epoll, non-blocking sockets with TCP_NODELAY, any number of
 * keep-alive connections. Each request head (up to its blank line) is answered "200 OK", content-length 3,
 * "ok\n", in order, so pipelined requests are safe. Only requests without a body are served: a
 * content-length other than 0, any transfer-encoding (chunked), or a head larger than 16 KiB gets a 400
 * and the connection is closed (the body is not read past). "connection: close" is honoured; on EOF the
 * answers already due are written, then the connection closes. stdout says "serving" once listening, and
 * nothing else; it runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define RBUF (1 << 16)
#define WBUF (1 << 18)
#define SLOTS 4096 /* concurrent streams tracked per h2 connection */

typedef struct {
    int64_t due;
    int got_data;
    int used;
} slot_t;

typedef struct {
    int fd;
    int busy;        /* h1: a request is in flight */
    int64_t due;     /* h1: when the in-flight request was due */
    uint32_t sid;    /* h2: next stream id */
    int inflight;    /* h2: open streams */
    size_t rlen, wlen;
    unsigned char rbuf[RBUF];
    unsigned char wbuf[WBUF];
    slot_t slots[SLOTS];
} conn_t;

static int grpc_mode;
static const char *host, *authority, *path;
static int port;
static unsigned char *body;
static size_t body_len;
static unsigned char hblock[1024];
static size_t hblock_len;
static int64_t *lat;
static long n_good, n_err, n_late;
static int64_t max_lag;
static int ep;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* HPACK integer with an n-bit prefix (RFC 7541 5.1). */
static size_t hpack_int(unsigned char *out, unsigned char first, int bits, size_t v) {
    size_t n = 0, max = (1u << bits) - 1;
    if (v < max) {
        out[n++] = first | (unsigned char)v;
        return n;
    }
    out[n++] = first | (unsigned char)max;
    v -= max;
    while (v >= 128) {
        out[n++] = (unsigned char)(v % 128 + 128);
        v /= 128;
    }
    out[n++] = (unsigned char)v;
    return n;
}

static size_t hpack_str(unsigned char *out, const char *s) {
    size_t len = strlen(s), n = hpack_int(out, 0, 7, len);
    memcpy(out + n, s, len);
    return n + len;
}

/* The request headers, the same for every call: static-table indexes, literals never indexed. */
static void build_hblock(void) {
    unsigned char *p = hblock;
    *p++ = 0x83;                              /* :method POST */
    *p++ = 0x86;                              /* :scheme http */
    p += hpack_int(p, 0x00, 4, 4);            /* :path (name index 4), literal value */
    p += hpack_str(p, path);
    p += hpack_int(p, 0x00, 4, 1);            /* :authority (name index 1) */
    p += hpack_str(p, authority);
    p += hpack_int(p, 0x00, 4, 31);           /* content-type (name index 31) */
    p += hpack_str(p, "application/grpc");
    *p++ = 0x00;                              /* te: trailers (new name) */
    p += hpack_str(p, "te");
    p += hpack_str(p, "trailers");
    hblock_len = (size_t)(p - hblock);
}

static void queue_bytes(conn_t *c, const void *data, size_t len) {
    if (c->wlen + len > WBUF) {
        fprintf(stderr, "openloop: write buffer full\n");
        exit(2);
    }
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += len;
}

static void frame(conn_t *c, int type, int flags, uint32_t sid, const void *payload, size_t len) {
    unsigned char h[9] = {(unsigned char)(len >> 16), (unsigned char)(len >> 8), (unsigned char)len,
                          (unsigned char)type, (unsigned char)flags, (unsigned char)(sid >> 24 & 0x7f),
                          (unsigned char)(sid >> 16), (unsigned char)(sid >> 8), (unsigned char)sid};
    queue_bytes(c, h, 9);
    if (len)
        queue_bytes(c, payload, len);
}

static void flush(conn_t *c) {
    size_t off = 0;
    while (off < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + off, c->wlen - off);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            die("write");
        }
        off += (size_t)n;
    }
    memmove(c->wbuf, c->wbuf + off, c->wlen - off);
    c->wlen -= off;
    struct epoll_event ev = {.events = EPOLLIN | (c->wlen ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void open_conn(conn_t *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        die("inet_pton");
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    c->busy = 0, c->sid = 1, c->inflight = 0, c->rlen = 0, c->wlen = 0;
    memset(c->slots, 0, sizeof c->slots);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    if (grpc_mode) {
        static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        /* No push; windows as large as allowed, so flow control never throttles the responses. */
        unsigned char settings[] = {0, 2, 0, 0, 0, 0, 0, 4, 0x7f, 0xff, 0xff, 0xff};
        uint32_t inc = 0x7fffffffu - 65535u;
        unsigned char wu[] = {(unsigned char)(inc >> 24), (unsigned char)(inc >> 16), (unsigned char)(inc >> 8),
                              (unsigned char)inc};
        queue_bytes(c, preface, sizeof preface - 1);
        frame(c, 4, 0, 0, settings, sizeof settings);
        frame(c, 8, 0, 0, wu, sizeof wu);
        flush(c);
    }
}

static void done_one(int64_t due, int good) {
    if (good)
        lat[n_good++] = now_ns() - due;
    else
        n_err++;
}

/* A connection the peer closed: its in-flight requests failed; open a new one. */
static void reopen(conn_t *c) {
    if (c->busy)
        done_one(c->due, 0);
    for (int i = 0; i < SLOTS; i++)
        if (c->slots[i].used)
            done_one(c->slots[i].due, 0);
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    open_conn(c);
}

static void send_one(conn_t *c, int64_t due) {
    int64_t lag = now_ns() - due;
    if (lag > max_lag)
        max_lag = lag;
    if (lag > 1000000)
        n_late++;
    if (grpc_mode) {
        uint32_t sid = c->sid;
        c->sid += 2;
        slot_t *s = &c->slots[(sid >> 1) % SLOTS];
        s->due = due, s->got_data = 0, s->used = 1;
        c->inflight++;
        frame(c, 1, 0x4, sid, hblock, hblock_len); /* HEADERS, END_HEADERS */
        frame(c, 0, 0x1, sid, body, body_len);     /* DATA, END_STREAM */
    } else {
        char req[1024];
        int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, authority);
        queue_bytes(c, req, (size_t)n);
        c->busy = 1, c->due = due;
    }
    flush(c);
}

/* Case-insensitive search for a header line; returns its value or NULL. */
static const char *header(const char *head, size_t len, const char *name) {
    size_t nl = strlen(name);
    for (size_t i = 0; i + nl < len; i++)
        if ((i == 0 || head[i - 1] == '\n') && strncasecmp(head + i, name, nl) == 0 && head[i + nl] == ':')
            return head + i + nl + 1;
    return NULL;
}

static void read_h1(conn_t *c) {
    for (;;) {
        unsigned char *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
        if (!end)
            return;
        size_t head = (size_t)(end - c->rbuf) + 4;
        const char *cl = header((const char *)c->rbuf, head, "content-length");
        size_t total;
        if (cl) {
            total = head + strtoul(cl, NULL, 10);
        } else if (header((const char *)c->rbuf, head, "transfer-encoding")) {
            unsigned char *last = memmem(c->rbuf + head, c->rlen - head, "0\r\n\r\n", 5);
            if (!last)
                return;
            total = (size_t)(last - c->rbuf) + 5;
        } else {
            total = head;
        }
        if (c->rlen < total)
            return;
        int good = c->rlen >= 12 && memcmp(c->rbuf, "HTTP/1.1 200", 12) == 0;
        if (c->busy)
            done_one(c->due, good);
        c->busy = 0;
        memmove(c->rbuf, c->rbuf + total, c->rlen - total);
        c->rlen -= total;
    }
}

static void read_h2(conn_t *c) {
    size_t off = 0;
    while (c->rlen - off >= 9) {
        unsigned char *h = c->rbuf + off;
        size_t len = (size_t)h[0] << 16 | (size_t)h[1] << 8 | h[2];
        int type = h[3], flags = h[4];
        uint32_t sid = ((uint32_t)h[5] << 24 | (uint32_t)h[6] << 16 | (uint32_t)h[7] << 8 | h[8]) & 0x7fffffffu;
        if (len + 9 > RBUF) {
            fprintf(stderr, "openloop: frame too large\n");
            exit(2);
        }
        if (c->rlen - off < 9 + len)
            break;
        slot_t *s = sid ? &c->slots[(sid >> 1) % SLOTS] : NULL;
        if (type == 4 && !(flags & 1)) {
            frame(c, 4, 1, 0, NULL, 0); /* SETTINGS ACK */
        } else if (type == 6 && !(flags & 1)) {
            frame(c, 6, 1, 0, h + 9, len); /* PING ACK */
        } else if (type == 7) {
            fprintf(stderr, "openloop: GOAWAY from the server\n");
            reopen(c);
            return;
        } else if (s && s->used && (type == 0 || type == 1 || type == 3)) {
            if (type == 0 && len > (flags & 0x8 ? 1u + h[9] : 0u))
                s->got_data = 1;
            /* The stream ends with trailers (HEADERS + END_STREAM), a DATA + END_STREAM (no trailers: not
             * a complete gRPC answer) or a reset. */
            if (type == 3 || (flags & 1)) {
                done_one(s->due, type == 1 && s->got_data);
                s->used = 0;
                c->inflight--;
            }
        }
        off += 9 + len;
    }
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= off;
    if (c->wlen)
        flush(c);
}

static void on_readable(conn_t *c) {
    for (;;) {
        ssize_t n = read(c->fd, c->rbuf + c->rlen, RBUF - c->rlen);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            reopen(c);
            return;
        }
        if (n < 0)
            return;
        c->rlen += (size_t)n;
        if (grpc_mode)
            read_h2(c);
        else
            read_h1(c);
        if (c->rlen == RBUF) {
            fprintf(stderr, "openloop: response too large\n");
            exit(2);
        }
    }
}

/* ------------------------------------------------------------------------------------------ serve */

#define SRBUF (1 << 14)
#define SWBUF (1 << 16)

typedef struct {
    int fd;
    int closing;     /* write what is queued, then close */
    uint32_t events; /* what epoll watches for now */
    size_t rlen, wlen;
    char rbuf[SRBUF];
    char wbuf[SWBUF];
} sconn_t;

static const char OK[] = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
static const char BAD[] = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/* Whether a header value (after the colon, ending at CR) is the number 0: the only body this server takes. */
static int zero_length(const char *v) {
    char *end;
    while (*v == ' ' || *v == '\t')
        v++;
    if (*v < '0' || *v > '9')
        return 0;
    unsigned long n = strtoul(v, &end, 10);
    while (*end == ' ' || *end == '\t')
        end++;
    return n == 0 && *end == '\r';
}

static void squeue(sconn_t *c, const char *s, size_t len) {
    memcpy(c->wbuf + c->wlen, s, len);
    c->wlen += len;
}

/* Answer every complete request in rbuf, in order (pipelining), while wbuf has room for an answer. */
static void sanswer(sconn_t *c) {
    size_t off = 0;
    while (!c->closing && c->wlen + sizeof BAD <= SWBUF) {
        char *end = memmem(c->rbuf + off, c->rlen - off, "\r\n\r\n", 4);
        if (!end) {
            if (off == 0 && c->rlen == SRBUF) { /* a request head larger than the buffer */
                squeue(c, BAD, sizeof BAD - 1);
                c->closing = 1;
            }
            break;
        }
        const char *req = c->rbuf + off;
        size_t head = (size_t)(end - req) + 4;
        const char *cl = header(req, head, "content-length");
        const char *conn = header(req, head, "connection");
        if ((cl && !zero_length(cl)) || header(req, head, "transfer-encoding")) {
            squeue(c, BAD, sizeof BAD - 1); /* a body: not what the bench sends, and not skipped */
            c->closing = 1;
        } else {
            squeue(c, OK, sizeof OK - 1);
            while (conn && (*conn == ' ' || *conn == '\t'))
                conn++;
            if (conn && strncasecmp(conn, "close", 5) == 0)
                c->closing = 1;
        }
        off += head;
    }
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= off;
}

/* Write what is queued and watch for what comes next; -1 when the connection is closed (and freed). */
static int sflush(sconn_t *c) {
    size_t off = 0;
    while (off < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + off, c->wlen - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n < 0) {
            c->wlen = off = 0, c->closing = 1; /* the peer is gone: nothing more to write */
            break;
        }
        off += (size_t)n;
    }
    memmove(c->wbuf, c->wbuf + off, c->wlen - off);
    c->wlen -= off;
    if (c->closing && !c->wlen) {
        /* Read what already arrived, so the close is a FIN: unread bytes would make it a reset, and a
         * reset can overtake a 400 still on its way. */
        char sink[4096];
        shutdown(c->fd, SHUT_WR);
        while (read(c->fd, sink, sizeof sink) > 0)
            ;
        close(c->fd); /* the last reference: epoll forgets it */
        free(c);
        return -1;
    }
    uint32_t want = (c->closing || c->rlen == SRBUF ? 0 : EPOLLIN) | (c->wlen ? EPOLLOUT : 0);
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->events = want;
    }
    return 0;
}

static void sreadable(sconn_t *c) {
    if (c->rlen == SRBUF) { /* a full buffer waits for room in wbuf (an EPOLLHUP or EPOLLERR brought us) */
        sflush(c);
        return;
    }
    ssize_t n = read(c->fd, c->rbuf + c->rlen, SRBUF - c->rlen);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n > 0)
        c->rlen += (size_t)n;
    sanswer(c);
    if (n <= 0) /* EOF (or an error): answer what came complete, write it, close */
        c->closing = 1;
    sflush(c);
}

static _Noreturn void serve(const char *h, int p) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p)};
    if (inet_pton(AF_INET, h, &sa.sin_addr) != 1)
        die("inet_pton");
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    if (lfd < 0)
        die("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1024) < 0)
        die("bind/listen");
    signal(SIGPIPE, SIG_IGN); /* a write to a closed peer is an EPIPE, not the end of the server */
    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("serving\n");
    fflush(stdout);
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            sconn_t *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (!c)
                        die("calloc");
                    c->fd = fd, c->events = EPOLLIN;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                if (sflush(c) < 0)
                    continue;
                sanswer(c); /* requests that waited for room in wbuf */
                if (sflush(c) < 0)
                    continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                sreadable(c);
        }
    }
}

/* ------------------------------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    int64_t spin_ns = 0;
    if (argc >= 4 && strcmp(argv[1], "serve") == 0)
        serve(argv[2], atoi(argv[3]));
    if (argc > 3 && strcmp(argv[1], "-s") == 0) {
        spin_ns = (int64_t)(atof(argv[2]) * 1000);
        argc -= 2, argv += 2;
    }
    if (argc < 9 || (strcmp(argv[1], "grpc") == 0 && argc < 10)) {
        fprintf(stderr, "usage: openloop [-s SPIN_US] h1|grpc HOST PORT AUTHORITY PATH RATE SECONDS CONNS "
                        "[BODYFILE]\n       openloop serve HOST PORT\n");
        return 2;
    }
    grpc_mode = strcmp(argv[1], "grpc") == 0;
    host = argv[2], port = atoi(argv[3]), authority = argv[4], path = argv[5];
    long rate = atol(argv[6]);
    double seconds = atof(argv[7]);
    int nconns = atoi(argv[8]);
    if (rate <= 0 || seconds <= 0 || nconns <= 0) {
        fprintf(stderr, "openloop: RATE, SECONDS and CONNS must be positive\n");
        return 2;
    }
    if (grpc_mode) {
        FILE *f = fopen(argv[9], "rb");
        if (!f)
            die(argv[9]);
        body = malloc(1 << 14);
        body_len = fread(body, 1, 1 << 14, f);
        fclose(f);
        build_hblock();
    }
    long total = (long)(rate * seconds);
    lat = malloc(sizeof(int64_t) * (size_t)(total > 0 ? total : 1));
    int64_t *pending = malloc(sizeof(int64_t) * (size_t)(total > 0 ? total : 1));
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    if (!lat || !pending || !conns)
        die("malloc");
    ep = epoll_create1(0);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    for (int i = 0; i < nconns; i++)
        open_conn(&conns[i]);

    int64_t start = now_ns() + 20000000LL; /* 20 ms for the connections to settle */
    int64_t deadline = start + (int64_t)(seconds * 1e9) + 10000000000LL;
    long next = 0, phead = 0, ptail = 0;
    int64_t armed = -1; /* when the timer is set to fire */
    int rr = 0;
    struct epoll_event evs[64];
    while (n_good + n_err < total) {
        int64_t now = now_ns();
        if (now > deadline)
            break;
        while (next < total && start + next * 1000000000LL / rate <= now)
            pending[ptail++] = start + next++ * 1000000000LL / rate;
        /* Dispatch due requests: h1 to a free connection, h2 round robin over the connections. */
        while (phead < ptail) {
            conn_t *c = NULL;
            for (int k = 0; k < nconns && !c; k++) {
                conn_t *cand = &conns[(rr + k) % nconns];
                if (grpc_mode ? cand->inflight < SLOTS - 1 && !cand->slots[(cand->sid >> 1) % SLOTS].used
                              : !cand->busy)
                    c = cand;
            }
            if (!c)
                break;
            rr = (int)(c - conns + 1) % nconns;
            send_one(c, pending[phead++]);
        }
        int64_t wake = next < total ? start + next * 1000000000LL / rate : deadline;
        int timeout = -1;
        if (next < total && wake - now_ns() <= spin_ns) {
            timeout = 0; /* within SPIN_US of the due time: poll, do not sleep */
        } else {
            if (next < total)
                wake -= spin_ns;
            if (wake != armed) {
                struct itimerspec its = {.it_value = {.tv_sec = wake / 1000000000LL,
                                                      .tv_nsec = wake % 1000000000LL}};
                timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
                armed = wake;
            }
        }
        int n = epoll_wait(ep, evs, 64, timeout);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) < 0 && errno != EAGAIN)
                    die("timerfd");
                continue;
            }
            if (evs[i].events & EPOLLOUT)
                flush(c);
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
    }
    n_err += total - n_good - n_err; /* never answered within 10 s of the end */
    printf("openloop n=%ld errors=%ld late=%ld max_lag_us=%.1f\n", n_good, n_err, n_late, (double)max_lag / 1e3);
    for (long i = 0; i < n_good; i++)
        printf("%lld\n", (long long)lat[i]);
    return 0;
}
