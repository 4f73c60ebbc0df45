/* Chained block keys in one call: key[i] = SHA-256(key[i-1] || block i)[:16].
 *
 * The same function as kvstore.keys.block_keys, without a Python step per
 * block. The compression is OpenSSL's (SHA extensions where the CPU has
 * them); the message schedule of each block is laid out here, so a block
 * costs its compressions and nothing else: no hashing context to set up,
 * no buffering of a partial block.
 */
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_Transform: the bare compression */
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

#define KEY_BYTES 16
#define MAX_MESSAGE 8192 /* bytes of one block's message (key + tokens) */

static void store_be64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

/* Writes nblocks records of prefix_len + KEY_BYTES bytes to out, each the
 * prefix (a namespace tag, say) and then the key, so a caller that indexes
 * keys in scoped form gets them with no second pass; returns 0, or -1 when a
 * block is too large for the message buffer (the caller keys such blocks in
 * Python) or the prefix is longer than a key. */
int kvstore_chain_keys(const uint8_t *start, const uint8_t *data, uint64_t nblocks,
                       uint64_t block_bytes, uint8_t *out, const uint8_t *prefix,
                       uint64_t prefix_len) {
    uint64_t len = KEY_BYTES + block_bytes;
    uint64_t padded = (len + 9 + 63) / 64 * 64;
    uint64_t stride = prefix_len + KEY_BYTES;
    if (padded > MAX_MESSAGE || prefix_len > KEY_BYTES) return -1;
    uint8_t msg[MAX_MESSAGE];
    memset(msg, 0, padded);
    msg[len] = 0x80;
    store_be64(msg + padded - 8, len * 8);
    const uint8_t *prev = start;
    for (uint64_t i = 0; i < nblocks; i++) {
        memcpy(msg, prev, KEY_BYTES);
        memcpy(msg + KEY_BYTES, data + i * block_bytes, block_bytes);
        SHA256_CTX ctx;
        SHA256_Init(&ctx);
        for (uint64_t at = 0; at < padded; at += 64) SHA256_Transform(&ctx, msg + at);
        uint8_t *rec = out + i * stride;
        memcpy(rec, prefix, prefix_len);
        uint8_t *key = rec + prefix_len;
        for (int w = 0; w < KEY_BYTES / 4; w++) {
            uint32_t h = ctx.h[w];
            key[4 * w] = (uint8_t)(h >> 24);
            key[4 * w + 1] = (uint8_t)(h >> 16);
            key[4 * w + 2] = (uint8_t)(h >> 8);
            key[4 * w + 3] = (uint8_t)h;
        }
        prev = key;
    }
    return 0;
}
