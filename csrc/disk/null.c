/* null.c — a disk that does no I/O: reads return zeroes, everything else succeeds.
 * It measures the data plane alone (ring walk, parsing, completion, notification).
 */
#include <string.h>

#include "engine/engine.h"

void null_submit(struct dp_engine *engine, struct dp_req *req)
{
    (void)engine;
    if (req->type == VIRTIO_BLK_T_IN)
        for (unsigned i = 0; i < req->iovcnt; i++)
            memset(req->iov[i].iov_base, 0, req->iov[i].iov_len);
    req_complete(req, VIRTIO_BLK_S_OK);
}
