/* vu_socket.c — the front end's vhost-user socket when more than one thread talks on it: the
 * Python frontend (its messages, the vIOMMU answering misses) and driver threads that map and
 * unmap each request's buffers (dataplane load --iommu request). A message and its reply are
 * one exchange under the socket's lock, whoever sends it, so replies never go to the wrong
 * thread. The socket stays the caller's (Python's); it may be non-blocking (a Python socket
 * with a timeout is), so the exchange here waits with poll().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "driver/dp_driver.h"
#include "util/clock.h"

#define VHOST_USER_IOTLB_MSG 22
#define VHOST_USER_VERSION 1
#define VHOST_USER_REPLY 4
#define VHOST_USER_NEED_REPLY 8

struct dp_vu_socket {
    pthread_mutex_t lock;
    int fd;
};

struct dp_vu_socket *dp_vu_socket_new(int fd)
{
    struct dp_vu_socket *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    pthread_mutex_init(&s->lock, NULL);
    s->fd = fd;
    return s;
}

void dp_vu_socket_free(struct dp_vu_socket *s)
{
    if (!s)
        return;
    pthread_mutex_destroy(&s->lock);
    free(s);
}

void dp_vu_socket_lock(struct dp_vu_socket *s)
{
    pthread_mutex_lock(&s->lock);
}

void dp_vu_socket_unlock(struct dp_vu_socket *s)
{
    pthread_mutex_unlock(&s->lock);
}

/* Wait until fd is ready for events, up to deadline (ns, CLOCK_MONOTONIC). */
static int wait_fd(int fd, short events, uint64_t deadline)
{
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline)
            return -ETIMEDOUT;
        struct pollfd p = { .fd = fd, .events = events };
        int ms = (int)((deadline - now + 999999) / 1000000);
        int rc = poll(&p, 1, ms);
        if (rc > 0)
            return (p.revents & (POLLERR | POLLNVAL)) ? -EPIPE : 0;
        if (rc < 0 && errno != EINTR)
            return -errno;
    }
}

static int send_all(int fd, const uint8_t *buf, size_t len, uint64_t deadline)
{
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -errno;
        int rc = wait_fd(fd, POLLOUT, deadline);
        if (rc)
            return rc;
    }
    return 0;
}

static int recv_all(int fd, uint8_t *buf, size_t len, uint64_t deadline)
{
    while (len) {
        ssize_t n = recv(fd, buf, len, MSG_DONTWAIT);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n == 0)
            return -EPIPE;   /* the back end closed the socket */
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
        int rc = wait_fd(fd, POLLIN, deadline);
        if (rc)
            return rc;
    }
    return 0;
}

int dp_vu_iotlb_msg(struct dp_vu_socket *s, uint64_t iova, uint64_t size, uint64_t uaddr,
                    unsigned perm, unsigned type, int timeout_ms)
{
    /* header {request, flags, size} + struct vhost_iotlb_msg {iova, size, uaddr, perm, type} */
    uint8_t msg[12 + 32] = { 0 };
    uint32_t hdr[3] = { VHOST_USER_IOTLB_MSG, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY, 32 };
    memcpy(msg, hdr, sizeof(hdr));
    memcpy(msg + 12, &iova, 8);
    memcpy(msg + 20, &size, 8);
    memcpy(msg + 28, &uaddr, 8);
    msg[36] = (uint8_t)perm;
    msg[37] = (uint8_t)type;
    uint64_t deadline = now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 10000) * 1000000u;
    uint8_t reply[12 + 8];
    pthread_mutex_lock(&s->lock);
    int rc = send_all(s->fd, msg, sizeof(msg), deadline);
    if (!rc)
        rc = recv_all(s->fd, reply, sizeof(reply), deadline);
    pthread_mutex_unlock(&s->lock);
    if (rc)
        return rc;
    uint32_t rhdr[3];
    uint64_t status;
    memcpy(rhdr, reply, sizeof(rhdr));
    memcpy(&status, reply + 12, sizeof(status));
    if (rhdr[0] != VHOST_USER_IOTLB_MSG || !(rhdr[1] & VHOST_USER_REPLY) || rhdr[2] != 8)
        return -EPROTO;
    return status ? -EIO : 0;
}
