"""The cost model: what a request will cost, charged before any expensive work starts.

Every cost below is known from the body or from image headers alone; a request over a budget is
refused before anything is decoded or encoded, with the setting that refused it named.

    cost                          charged from                    budget (DUET_...)         refusal
    image bytes                   upload / base64 / download size MAX_UPLOAD_BYTES          413
    decoded pixels of an image    its header (width x height)     MAX_IMAGE_PIXELS          413
    pixels after the model resize its header + the model's resize MAX_RESIZED_PIXELS        413
    decoded pixels of a request   every image header              MAX_REQUEST_PIXELS        413
    texts + images of a request   count                           MAX_ITEMS_PER_REQUEST     422
    items of an add / ids of a    count                           MAX_UPDATE_ITEMS          413
    batch delete
    an added item's metadata      its compact JSON's bytes        MAX_ITEM_METADATA_BYTES   422
    a text, label or template     characters                      MAX_TEXT_CHARS            422
    /classify prompts             labels x templates              MAX_CLASSIFY_PROMPTS      422
    encoder work                  encode items: 1 per text,       MAX_QUEUE_ITEMS (all      429
                                  image or uncached prompt        requests together)
    request body parsing          body size; over 256 KiB parsed  MAX_REQUEST_BYTES         413
                                  in the threadpool
    base64 decoding               decoded bytes, a MiB at a time  MAX_UPLOAD_BYTES          413
                                  in the threadpool, stops there
    bytes sent back (/metadata)   the answer as it is built, off  MAX_RESPONSE_BYTES        413
                                  the event loop, one answer at
                                  a time (the others wait)
    an unread answer              time its client leaves it       SEND_TIMEOUT_S            abort
                                  unread (over 64 KiB waiting)
    an image_url download         bytes as sent and as decoded;   MAX_UPLOAD_BYTES,         413/400
                                  time, on the event loop; an     IMAGE_URL_TIMEOUT_S
                                  add's downloads one at a time,  (MAX_REQUEST_BYTES for
                                  their bytes summed              an add's together)
    decoding (serve.decoding)     decoded pixels of every image   MAX_DECODE_PIXELS per     429
                                  waiting or in decoding, from    lane (small images,
                                  headers, at admission           large ones)
    a search's metadata filter    conditions; values of its `in`  MAX_FILTER_CONDITIONS,    422
                                  lists (each one vectorised      MAX_FILTER_VALUES
                                  pass over the index's rows)
    tokenizing a text or prompt   its first 16 x context chars,   fixed by common.tokenize  none
                                  words in pieces of <= 128 bytes (<= ~10 ms a text), on
                                                                  the request's own thread
    a Qdrant call (vector_store   time waiting on the server, in  QDRANT_TIMEOUT_S per      503
    qdrant)                       the threadpool, never on the    call
                                  encoder thread
    a search's exact re-rank      k x rerank_factor candidates,   fixed: MAX_RERANK_          none
    (approximate index)           clamped                         CANDIDATES (10,000) of
                                                                  vector_search

A search over an approximate index re-scores k x rerank_factor candidates against the stored
vectors; the build chooses the factor (at most 200, serve/indexing/rerank_tuning.py) and k is at
most MAX_K (100), but whatever both are, one query re-ranks at most MAX_RERANK_CANDIDATES =
10,000 rows (5 MB read at D = 128 float32, 10 MB at D = 512 float16 on disk), gathered
RERANK_BLOCK_ROWS (65,536 rows) at a time. Measured (100k x 128 random unit vectors,
`IVF1024,PQ64x4fs`, nprobe 32, one thread, load ~6): p50 0.20 ms for k = 10 at x20, 0.71 ms
at x200, 1.71 ms for k = 100 at x200 (clamped to 10,000).

An added image's thumbnail is made in the same decode as its model input (serve.images), so it
costs what that decode is charged, on the decode threads.

Texts cost one encode item each whatever their length: the tokenizer cuts them at the model's
context length and every text is encoded at that length. Images cost one encode item each: they
reach the encoder as model-sized tensors. Decoding is bounded apart from encoding: at most
DECODE_THREADS large images and one small one (<= SMALL_IMAGE_PIXELS) are decoded at once, one at
a time per request. An image's pixels are charged by the memory its decode needs
(`ImageHeader.charged_pixels`: up to 8 bytes per pixel count once, a WebP at 16 twice), so the
decode memory alive at any moment is at most
(DECODE_THREADS x MAX_IMAGE_PIXELS + SMALL_IMAGE_PIXELS) x 8 bytes. Only JPEG, PNG, WebP, GIF and
BMP are opened (common.preprocess.ACCEPTED_FORMATS), first frame only: 415 for the rest.

Index builds (serve.indexing.build) hold every image they read to the same per-image bounds,
from the same settings (`ImageLimits`): over MAX_UPLOAD_BYTES, MAX_IMAGE_PIXELS or
MAX_RESIZED_PIXELS an image is skipped and counted by kind, never decoded.

Tokenizing is charged where it runs: on the request's threadpool thread, before its texts are
queued (`EncodeBatcher.tokenize`), never on the encoder thread; `common.tokenize` bounds it per
text, whatever the text, and a /classify prompt is built only as far as the tokenizer reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.preprocess import (
    ImageHeader,
    ImageTooLargeError,
    PreprocessCfg,
    ResizeLimit,
    check_image,
)
from serve.errors import ApiError
from serve.settings import ImageLimits, Settings


def resize_limit(settings: ImageLimits, cfg: PreprocessCfg) -> ResizeLimit:
    """The bound on an image's pixels after the model's resize (`max_resized_pixels`)."""
    return ResizeLimit(cfg, settings.max_resized_pixels)


def charge_image_sizes(
    headers: Sequence[ImageHeader],
    settings: Settings,
    limit: ResizeLimit,
    names: Sequence[str] | None = None,
) -> None:
    """413 image_too_large if one image (decoded or resized) or all of them together are over
    their budgets; `headers` are read from the images, nothing decoded. `names`: how the
    message names each image (default: "image i" when there are several)."""
    for i, header in enumerate(headers):
        try:
            check_image(header, max_pixels=settings.max_image_pixels, resize=limit)
        except ImageTooLargeError as exc:
            name = names[i] if names is not None else f"image {i}" if len(headers) > 1 else ""
            where = f"{name}: " if name else ""
            raise ApiError(413, "image_too_large", f"{where}{exc}") from None
    total = sum(header.charged_pixels for header in headers)
    if total > settings.max_request_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"the request's {len(headers)} images are {total} pixels together; the limit is "
            f"{settings.max_request_pixels} (max_request_pixels)",
        )


def charge_prompts(labels: int, templates: int, settings: Settings) -> None:
    """422 validation_error if a /classify's labels x templates is over the budget."""
    prompts = labels * templates
    if prompts > settings.max_classify_prompts:
        raise ApiError(
            422,
            "validation_error",
            f"body.labels: {labels} labels x {templates} templates = {prompts} prompts to "
            "encode; the limit "
            f"is {settings.max_classify_prompts} (max_classify_prompts): send fewer, or configure "
            "a label set (DUET_LABEL_SETS), embedded once at start-up",
        )
