/* iolog.c — a recording as a fio iolog, version 3: one file, one line per request in the order
 * the requests were taken from the rings, so that fio (read_iolog=, with replay_redirect= to
 * point it at a device) and `dataplane replay` play it back.
 *
 *     fio version 3 iolog
 *     0 vq0 add                          each queue is one of fio's files: vq0, vq1, ...
 *     0 vq0 open
 *     15 vq0 write 1048576 4096 write ok 10240
 *     17 vq1 sync 0 0 flush ok 351200
 *     20 vq0 write 0 65536 write-zeroes ok 5120
 *     25 vq1 trim 4194304 1048576 discard ioerr 700
 *     31 vq0 dropped 12 0                 entries lost to a full ring (fio says "bad iolog
 *     ...                                 file action" and goes on; dataplane counts them)
 *     9000 vq0 close
 *
 * The first five fields are fio's own (microseconds since the recording began, file, action,
 * offset, length); fio reads no further, so the last three are this backend's: the virtio-blk
 * operation (write-zeroes has no fio action and is a write there), the status the guest got
 * (ok, ioerr, unsupp; unknown when the completion was not recorded), and the time from taking
 * the request off the ring to completing it, in nanoseconds.
 *
 * A line waits for its request's completion (for the status), and lines of several queues are
 * merged by time: a queue's next line may be written once no queue can still produce an earlier
 * one, which is known from each queue's oldest request in flight, or, for a queue with nothing
 * in flight, from its last request and the clock (SLACK).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "record/record.h"

#define LINES_MIN 4096u
#define LINES_MAX (1u << 20)           /* per queue, waiting lines (32 MiB), unless hold_lines */
#define SLACK_NS 20000000ull           /* a quiet queue's next request is no older than now - 20 ms */
#define LINE_MAX_BYTES 128u

enum { LINE_PENDING, LINE_DONE, LINE_UNKNOWN, LINE_DROP };

struct iol_line {
    uint64_t time_ns;            /* taken from the ring (a DROP: the queue's last request) */
    uint64_t offset;             /* a DROP: entries lost */
    uint64_t latency_ns;
    uint32_t len;
    uint8_t info;
    uint8_t state;
};

struct iol_queue {
    char name[24];               /* " vq0 ": the file field, with its spaces */
    unsigned name_len;
    struct iol_line *lines;      /* circular, cap a power of two */
    uint64_t cap;
    uint64_t head, tail;         /* positions, free-running */
    int64_t *slot_pos;           /* request slot -> position of its waiting line, or -1 */
    unsigned nslots;
    uint64_t last_q_ns;          /* the last request taken from this queue's ring */
};

struct iol_state {
    uint64_t last_us;            /* the last time written */
    uint64_t hold;               /* lines a queue may hold */
    struct iol_queue q[];
};

static const char *const ACTION[] = { "read", "write", "sync", "trim", "write" };
static const char *const OP_NAME[] = { "read", "write", "flush", "discard", "write-zeroes" };
static const char *const STATUS[] = { "ok", "ioerr", "unsupp", "unknown" };

static struct iol_line *line_at(struct iol_queue *q, uint64_t pos)
{
    return &q->lines[pos & (q->cap - 1)];
}

static int grow_lines(struct iol_queue *q)
{
    uint64_t cap = q->cap * 2;
    struct iol_line *lines = malloc(cap * sizeof(*lines));
    if (!lines)
        return -ENOMEM;
    for (uint64_t pos = q->head; pos < q->tail; pos++)
        lines[pos & (cap - 1)] = *line_at(q, pos);
    free(q->lines);
    q->lines = lines;
    q->cap = cap;
    return 0;
}

static int grow_slots(struct iol_queue *q, unsigned slot)
{
    unsigned n = q->nslots;
    while (n <= slot)
        n *= 2;
    int64_t *pos = realloc(q->slot_pos, n * sizeof(*pos));
    if (!pos)
        return -ENOMEM;
    for (unsigned i = q->nslots; i < n; i++)
        pos[i] = -1;
    q->slot_pos = pos;
    q->nslots = n;
    return 0;
}

/* A free line at the tail, or NULL when the queue already holds hold lines. */
static struct iol_line *append(struct iol_queue *q, uint64_t hold)
{
    if (q->tail - q->head >= hold ||
        (q->tail - q->head == q->cap && grow_lines(q) < 0))
        return NULL;
    return line_at(q, q->tail++);
}

static int iol_open(struct dp_recorder *rec, const char *path)
{
    unsigned n = rec->p.queues;
    struct iol_state *st = calloc(1, sizeof(*st) + n * sizeof(st->q[0]));
    if (!st)
        return -ENOMEM;
    rec->state = st;
    st->hold = rec->p.hold_lines ? rec->p.hold_lines : LINES_MAX;
    for (unsigned i = 0; i < n; i++) {
        struct iol_queue *q = &st->q[i];
        q->name_len = (unsigned)snprintf(q->name, sizeof(q->name), " %s%u ", rec->p.names, i);
        q->cap = LINES_MIN;
        q->lines = malloc(q->cap * sizeof(*q->lines));
        q->nslots = 256;
        q->slot_pos = malloc(q->nslots * sizeof(*q->slot_pos));
        if (!q->lines || !q->slot_pos)
            return -ENOMEM;
        for (unsigned s = 0; s < q->nslots; s++)
            q->slot_pos[s] = -1;
    }
    int rc = rec_open_outputs(rec, 1, &path);
    if (rc)
        return rc;
    struct rec_out *out = &rec->outs[0];
    /* The buffer is empty and large: the header always fits in it. */
    static const char *const acts[] = { "add", "open" };
    char *p = out_reserve(rec, out, 32);
    out_commit(out, (size_t)sprintf(p, "fio version 3 iolog\n"));
    for (unsigned a = 0; a < 2; a++)
        for (unsigned i = 0; i < n; i++) {
            p = out_reserve(rec, out, 64);
            out_commit(out, (size_t)sprintf(p, "0 %s%u %s\n", rec->p.names, i, acts[a]));
        }
    return 0;
}

static int iol_entry(struct dp_recorder *rec, unsigned qi, const struct dp_rec_entry *e)
{
    struct iol_state *st = rec->state;
    struct iol_queue *q = &st->q[qi];
    if (e->slot >= q->nslots && e->kind != DP_REC_DROP && grow_slots(q, e->slot) < 0)
        return -EAGAIN;
    int64_t *pos = e->kind == DP_REC_DROP ? NULL : &q->slot_pos[e->slot];
    struct iol_line *l;
    if (e->kind == DP_REC_C && *pos >= 0 && (uint64_t)*pos >= q->head) {
        l = line_at(q, (uint64_t)*pos);
        if (l->state == LINE_PENDING) {
            l->state = LINE_DONE;
            l->info = e->info;
            l->latency_ns = e->time_ns - e->aux;
        }
        *pos = -1;
        return 0;
    }
    if (e->kind == DP_REC_C && e->aux < rec->start_ns) {
        if (pos)
            *pos = -1;
        return 0;   /* taken from the ring before the recording began */
    }
    if (q->tail - q->head >= st->hold) {
        /* A request that never completes holds every later line: let it go without a status. */
        struct iol_line *h = line_at(q, q->head);
        if (h->state == LINE_PENDING)
            h->state = LINE_UNKNOWN;
        return -EAGAIN;
    }
    if (e->kind == DP_REC_Q && *pos >= 0 && (uint64_t)*pos >= q->head &&
        line_at(q, (uint64_t)*pos)->state == LINE_PENDING)
        line_at(q, (uint64_t)*pos)->state = LINE_UNKNOWN;   /* its completion was lost */
    l = append(q, st->hold);
    if (!l)
        return -EAGAIN;
    switch (e->kind) {
    case DP_REC_Q:
        *l = (struct iol_line){ .time_ns = e->time_ns, .offset = e->offset, .len = e->len,
                                .info = e->info, .state = LINE_PENDING };
        *pos = (int64_t)(q->tail - 1);
        if (e->time_ns > q->last_q_ns)
            q->last_q_ns = e->time_ns;
        break;
    case DP_REC_C:   /* its Q was lost: the completion says everything but comes late */
        *l = (struct iol_line){ .time_ns = e->aux, .offset = e->offset, .len = e->len,
                                .info = e->info, .latency_ns = e->time_ns - e->aux,
                                .state = LINE_DONE };
        *pos = -1;
        break;
    default:
        *l = (struct iol_line){ .time_ns = q->last_q_ns, .offset = e->aux, .state = LINE_DROP };
        break;
    }
    return 0;
}

/* word and a space */
static char *put_word(char *s, const char *word)
{
    while (*word)
        *s++ = *word++;
    *s++ = ' ';
    return s;
}

static int write_line(struct dp_recorder *rec, unsigned qi, const struct iol_line *l)
{
    char *p = out_reserve(rec, &rec->outs[0], LINE_MAX_BYTES);
    if (!p)
        return -EAGAIN;
    struct iol_state *st = rec->state;
    char *s = p;
    uint64_t us = l->time_ns > rec->start_ns ? (l->time_ns - rec->start_ns) / 1000 : 0;
    if (us < st->last_us)
        us = st->last_us;   /* a late line (its Q was lost) does not step fio's clock back */
    st->last_us = us;
    s = rec_u64(s, us);
    memcpy(s, st->q[qi].name, st->q[qi].name_len);
    s += st->q[qi].name_len;
    if (l->state == LINE_DROP) {
        s += sprintf(s, "dropped ");
        s = rec_u64(s, l->offset);
        memcpy(s, " 0\n", 3);
        out_commit(&rec->outs[0], (size_t)(s + 3 - p));
        return 0;
    }
    unsigned op = REC_OP(l->info);
    int flush = op == DP_REC_OP_FLUSH;
    s = put_word(s, ACTION[op]);
    s = rec_u64(s, flush ? 0 : l->offset);
    *s++ = ' ';
    s = rec_u64(s, flush ? 0 : l->len);
    *s++ = ' ';
    s = put_word(s, OP_NAME[op]);
    s = put_word(s, STATUS[l->state == LINE_DONE ? REC_STATUS(l->info) : 3]);
    s = rec_u64(s, l->state == LINE_DONE ? l->latency_ns : 0);
    *s++ = '\n';
    out_commit(&rec->outs[0], (size_t)(s - p));
    return 0;
}

static uint64_t iol_pump(struct dp_recorder *rec, uint64_t now, int final, int *blocked)
{
    struct iol_state *st = rec->state;
    unsigned n = rec->p.queues;
    uint64_t floor = now > SLACK_NS ? now - SLACK_NS : 0;
    uint64_t written = 0;
    for (;;) {
        int best = -1;
        uint64_t best_t = 0;
        for (unsigned i = 0; i < n; i++) {
            struct iol_queue *q = &st->q[i];
            if (q->head != q->tail && (best < 0 || line_at(q, q->head)->time_ns < best_t)) {
                best = (int)i;
                best_t = line_at(q, q->head)->time_ns;
            }
        }
        if (best < 0)
            break;
        struct iol_queue *q = &st->q[best];
        struct iol_line *l = line_at(q, q->head);
        if (!final) {
            if (l->state == LINE_PENDING)
                break;   /* the oldest request in flight holds everything after it */
            int later = 0;
            for (unsigned i = 0; i < n && !later; i++) {
                struct iol_queue *o = &st->q[i];
                uint64_t bound = o->last_q_ns > floor ? o->last_q_ns : floor;
                later = o->head == o->tail && bound < best_t;
            }
            if (later)
                break;   /* a quiet queue might still bring an earlier line */
        }
        if (write_line(rec, (unsigned)best, l) < 0) {
            *blocked = 1;
            break;
        }
        q->head++;
        written++;
    }
    return written;
}

static void iol_finish(struct dp_recorder *rec)
{
    struct iol_state *st = rec->state;
    for (unsigned i = 0; i < rec->p.queues; i++) {
        char *p = out_reserve(rec, &rec->outs[0], 64);
        if (!p)
            return;
        char *s = rec_u64(p, st->last_us);
        s += sprintf(s, " %s%u close\n", rec->p.names, i);
        out_commit(&rec->outs[0], (size_t)(s - p));
    }
}

static void iol_free(struct dp_recorder *rec)
{
    struct iol_state *st = rec->state;
    if (!st)
        return;
    for (unsigned i = 0; i < rec->p.queues; i++) {
        free(st->q[i].lines);
        free(st->q[i].slot_pos);
    }
    free(st);
    rec->state = NULL;
}

const struct rec_format rec_iolog = {
    .open = iol_open, .entry = iol_entry, .pump = iol_pump, .finish = iol_finish, .free = iol_free,
};
