/* recorder.c — a recording: one record ring per queue, the output file(s), and the writer
 * thread between them.
 *
 * The writer takes entries from each ring in turn (a batch at a time, so one busy queue does
 * not starve the others), hands them to the format (blktrace.c, iolog.c), and writes the
 * format's buffers out. It polls: when a round finds nothing it writes what is buffered and
 * sleeps, 1 ms at first, doubling up to 8 ms while nothing comes (a ring of 256 Ki entries
 * holds 130 ms at a million requests a second: the sleep alone never fills it, and a writer
 * the scheduler keeps waiting for a while on a busy machine has that much slack).
 * Nothing here ever makes the I/O threads wait: they only publish into their rings.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "record/record.h"
#include "util/clock.h"

#define OUT_BUF (1u << 20)
#define BATCH 4096u
#define SLEEP_MIN_NS 1000000ull
#define SLEEP_MAX_NS 8000000ull
#define CLOSE_WAIT_NS 10000000000ull   /* a pipe nobody reads: give up after 10 s */

static void set_error(struct dp_recorder *rec, int err)
{
    if (!__atomic_load_n(&rec->error, __ATOMIC_RELAXED))
        __atomic_store_n(&rec->error, err, __ATOMIC_RELAXED);
}

char *rec_u64(char *p, uint64_t v)
{
    char tmp[20];
    unsigned n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

/* ---- outputs ---- */

int out_flush(struct dp_recorder *rec, struct rec_out *out)
{
    if (__atomic_load_n(&rec->error, __ATOMIC_RELAXED)) {
        out->len = 0;
        out->blocked = 0;
        return 0;
    }
    size_t done = 0;
    int rc = 0;
    while (done < out->len) {
        ssize_t n = write(out->fd, out->buf + done, out->len - done);
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        rc = n < 0 ? -errno : -EIO;
        break;
    }
    __atomic_store_n(&out->bytes, out->bytes + done, __ATOMIC_RELAXED);
    out->blocked = rc == -EAGAIN;
    if (rc && rc != -EAGAIN) {
        set_error(rec, rc);   /* the file is lost from here on: keep draining, write nothing */
        done = out->len;
    }
    memmove(out->buf, out->buf + done, out->len - done);
    out->len -= done;
    return rc;
}

char *out_reserve(struct dp_recorder *rec, struct rec_out *out, size_t n)
{
    if (__atomic_load_n(&rec->error, __ATOMIC_RELAXED)) {
        out->len = 0;   /* failed: what comes is dropped (its entries were still counted) */
        return out->buf;
    }
    if (out->len + n > out->cap) {
        int rc = out_flush(rec, out);
        if (rc == -EAGAIN && out->len + n > out->cap)
            return NULL;
        if (rc && rc != -EAGAIN)
            out->len = 0;
    }
    return out->buf + out->len;
}

void out_commit(struct rec_out *out, size_t n)
{
    out->len += n;
}

static int open_output(struct rec_out *out, const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0644);
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        if (ftruncate(fd, 0) < 0) {
            int rc = -errno;
            close(fd);
            return rc;
        }
        /* Regular files never answer EAGAIN; blocking keeps short writes out of the way. */
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    }
    out->buf = malloc(OUT_BUF);
    if (!out->buf) {
        close(fd);
        return -ENOMEM;
    }
    out->fd = fd;
    out->cap = OUT_BUF;
    return 0;
}

int rec_open_outputs(struct dp_recorder *rec, unsigned nouts, const char *const *paths)
{
    rec->outs = calloc(nouts, sizeof(*rec->outs));
    if (!rec->outs)
        return -ENOMEM;
    for (unsigned i = 0; i < nouts; i++)
        rec->outs[i].fd = -1;
    rec->nouts = nouts;
    for (unsigned i = 0; i < nouts; i++) {
        int rc = open_output(&rec->outs[i], paths[i]);
        if (rc)
            return rc;
    }
    return 0;
}

/* The last writes: wait for a slow pipe, but not for ever. */
static void drain_outputs(struct dp_recorder *rec)
{
    uint64_t deadline = now_ns() + CLOSE_WAIT_NS;
    for (unsigned i = 0; i < rec->nouts; i++) {
        struct rec_out *out = &rec->outs[i];
        while (out->len && out_flush(rec, out) == -EAGAIN) {
            uint64_t now = now_ns();
            if (now >= deadline) {
                set_error(rec, -ETIMEDOUT);
                break;
            }
            struct pollfd pfd = { .fd = out->fd, .events = POLLOUT };
            poll(&pfd, 1, 100);
        }
    }
}

static void close_outputs(struct dp_recorder *rec)
{
    for (unsigned i = 0; i < rec->nouts; i++) {
        if (rec->outs[i].fd >= 0)
            close(rec->outs[i].fd);
        rec->outs[i].fd = -1;
        free(rec->outs[i].buf);
        rec->outs[i].buf = NULL;
    }
}

/* ---- the writer thread ---- */

/* Up to BATCH entries of queue q into the format; stops early when its output is full. */
static uint64_t drain_ring(struct dp_recorder *rec, unsigned q, int *blocked)
{
    struct rec_ring *r = &rec->rings[q];
    const struct dp_rec_entry *e;
    uint64_t n = 0, marks = 0;
    while (n < BATCH && (e = rec_peek(r))) {
        if (rec->fmt->entry(rec, q, e) < 0) {
            *blocked = 1;
            break;
        }
        if (e->kind == DP_REC_DROP) {
            r->marked += e->aux;
            marks++;
        }
        r->next++;
        n++;
    }
    if (n) {
        rec_release(r);
        rec_count(&r->written, n - marks);
    }
    return n;
}

static int rings_empty(struct dp_recorder *rec)
{
    for (unsigned q = 0; q < rec->p.queues; q++)
        if (rec_peek(&rec->rings[q]))
            return 0;
    return 1;
}

static void wait_for_work(struct dp_recorder *rec, uint64_t ns, int blocked)
{
    if (blocked) {
        /* Wake as soon as a full output can take more. */
        struct pollfd pfds[64];
        unsigned n = 0;
        for (unsigned i = 0; i < rec->nouts && n < 64; i++)
            if (rec->outs[i].blocked)
                pfds[n++] = (struct pollfd){ .fd = rec->outs[i].fd, .events = POLLOUT };
        if (n) {
            poll(pfds, n, (int)(ns / 1000000));
            return;
        }
    }
    struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)ns };
    nanosleep(&ts, NULL);
}

static void *writer_main(void *arg)
{
    struct dp_recorder *rec = arg;
    uint64_t sleep_ns = SLEEP_MIN_NS;
    for (;;) {
        int stopping = __atomic_load_n(&rec->stop, __ATOMIC_ACQUIRE);
        int blocked = 0;
        uint64_t n = 0;
        for (unsigned q = 0; q < rec->p.queues; q++)
            n += drain_ring(rec, q, &blocked);
        n += rec->fmt->pump(rec, now_ns(), 0, &blocked);
        if (stopping && !blocked && rings_empty(rec))
            break;
        if (n && !blocked) {
            sleep_ns = SLEEP_MIN_NS;
            continue;
        }
        for (unsigned i = 0; i < rec->nouts; i++)
            if (rec->outs[i].len && out_flush(rec, &rec->outs[i]) == -EAGAIN)
                blocked = 1;
        if (stopping && blocked) {
            /* Nothing comes any more; what is left waits for the output (bounded). */
            drain_outputs(rec);
            if (__atomic_load_n(&rec->error, __ATOMIC_RELAXED)) {
                for (unsigned q = 0; q < rec->p.queues; q++)
                    while (drain_ring(rec, q, &blocked))
                        ;
                break;
            }
            continue;
        }
        wait_for_work(rec, sleep_ns, blocked);
        if (!n)
            sleep_ns = sleep_ns * 2 > SLEEP_MAX_NS ? SLEEP_MAX_NS : sleep_ns * 2;
    }
    /* Entries lost after the last one that got in have had no DROP entry to tell of them. */
    for (unsigned q = 0; q < rec->p.queues; q++) {
        struct rec_ring *r = &rec->rings[q];
        uint64_t untold = __atomic_load_n(&r->dropped, __ATOMIC_RELAXED) - r->marked;
        struct dp_rec_entry last = { .time_ns = now_ns(), .aux = untold, .kind = DP_REC_DROP };
        if (untold && rec->fmt->entry(rec, q, &last) == 0)
            r->marked += untold;
    }
    /* What the format still holds (iolog: lines waiting for the clock), as the output takes it. */
    for (;;) {
        int blocked = 0;
        rec->fmt->pump(rec, now_ns(), 1, &blocked);
        if (!blocked)
            break;
        drain_outputs(rec);   /* progress, or an error (then what is left is discarded) */
    }
    rec->fmt->finish(rec);
    drain_outputs(rec);
    return NULL;
}

/* ---- the recorder ---- */

static void recorder_free(struct dp_recorder *rec)
{
    if (rec->fmt && rec->fmt->free)
        rec->fmt->free(rec);
    close_outputs(rec);
    free(rec->outs);
    if (rec->rings)
        for (unsigned q = 0; q < rec->p.queues; q++)
            free(rec->rings[q].slots);
    free(rec->rings);
    free(rec);
}

struct dp_recorder *dp_recorder_new(const char *path, const struct dp_recorder_params *params,
                                    int *err)
{
    unsigned entries = params->ring_entries ? params->ring_entries : DP_REC_DEFAULT_ENTRIES;
    if (params->queues == 0 || params->queues > 1024 || entries < 4 || entries > (1u << 26) ||
        (entries & (entries - 1)) || params->format < DP_REC_BLKTRACE || params->format > DP_REC_NONE) {
        *err = -EINVAL;
        return NULL;
    }
    struct dp_recorder *rec = calloc(1, sizeof(*rec));
    if (!rec) {
        *err = -ENOMEM;
        return NULL;
    }
    rec->p = *params;
    rec->p.ring_entries = entries;
    rec->p.names[sizeof(rec->p.names) - 1] = '\0';
    if (!rec->p.names[0])
        memcpy(rec->p.names, "vq", 3);
    int rc = posix_memalign((void **)&rec->rings, 64, params->queues * sizeof(*rec->rings));
    if (rc) {
        rec->rings = NULL;
        recorder_free(rec);
        *err = -rc;
        return NULL;
    }
    memset(rec->rings, 0, params->queues * sizeof(*rec->rings));
    for (unsigned q = 0; q < params->queues; q++) {
        struct rec_ring *r = &rec->rings[q];
        r->size = r->csize = entries;
        r->slots = r->cslots = calloc(entries, sizeof(*r->slots));
        if (!r->slots) {
            recorder_free(rec);
            *err = -ENOMEM;
            return NULL;
        }
    }
    rec->start_ns = now_ns();
    clock_gettime(CLOCK_REALTIME, &rec->start_real);
    if (params->format == DP_REC_NONE) {
        *err = 0;
        return rec;
    }
    rec->fmt = params->format == DP_REC_BLKTRACE ? &rec_blktrace : &rec_iolog;
    rc = rec->fmt->open(rec, path);
    if (rc) {
        recorder_free(rec);
        *err = rc;
        return NULL;
    }
    /* The writer gets no signals (the control plane's main thread takes them). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&rec->thread, NULL, writer_main, rec);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc) {
        recorder_free(rec);
        *err = -rc;
        return NULL;
    }
    pthread_setname_np(rec->thread, "dp-record");
    rec->has_thread = 1;
    *err = 0;
    return rec;
}

int dp_recorder_stop(struct dp_recorder *rec)
{
    if (rec->has_thread) {
        __atomic_store_n(&rec->stop, 1, __ATOMIC_RELEASE);
        pthread_join(rec->thread, NULL);
        rec->has_thread = 0;
    }
    close_outputs(rec);
    return __atomic_load_n(&rec->error, __ATOMIC_RELAXED);
}

void dp_recorder_free(struct dp_recorder *rec)
{
    if (!rec)
        return;
    dp_recorder_stop(rec);
    recorder_free(rec);
}

struct rec_ring *rec_queue_ring(struct dp_recorder *rec, unsigned q)
{
    return q < rec->p.queues ? &rec->rings[q] : NULL;
}

void dp_recorder_get_stats(const struct dp_recorder *rec, unsigned queue, struct dp_record_stats *out)
{
    memset(out, 0, sizeof(*out));
    if (queue >= rec->p.queues)
        return;
    const struct rec_ring *r = &rec->rings[queue];
    out->requests = __atomic_load_n(&r->requests, __ATOMIC_RELAXED);
    out->dropped = __atomic_load_n(&r->dropped, __ATOMIC_RELAXED);
    out->written = __atomic_load_n(&r->written, __ATOMIC_RELAXED);
}

uint64_t dp_recorder_bytes(const struct dp_recorder *rec)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < rec->nouts; i++)
        n += __atomic_load_n(&rec->outs[i].bytes, __ATOMIC_RELAXED);
    return n;
}

int dp_recorder_error(const struct dp_recorder *rec)
{
    return __atomic_load_n(&rec->error, __ATOMIC_RELAXED);
}

unsigned dp_recorder_take(struct dp_recorder *rec, unsigned queue, struct dp_rec_entry *out,
                          unsigned max)
{
    if (rec->fmt || queue >= rec->p.queues)
        return 0;   /* the writer thread's rings are its own */
    struct rec_ring *r = &rec->rings[queue];
    const struct dp_rec_entry *e;
    unsigned n = 0;
    while (n < max && (e = rec_peek(r))) {
        out[n++] = *e;
        r->next++;
    }
    if (n) {
        rec_release(r);
        rec_count(&r->written, n);
    }
    return n;
}
