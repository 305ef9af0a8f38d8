"""`imageUrl`: an image-to-image input the ingress fetches, never the model replica.

The fetch goes through the outbound guard of job callbacks (serve_app/outbound.py: http(s)
only, every address the host resolves to checked, the connection to the checked address,
each redirect's target checked again), streamed within limits.max_input_image_bytes and
ingress.image_url.timeout_s. The bytes then take the checks of an uploaded image, and the
request goes on as if it had carried them: an async job stores them, not the URL, so its
run fetches nothing.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from serve_app.config import AppConfig
from serve_app.errors import ImageUrlFailed, ImageUrlRefused, InvalidImage, PayloadTooLarge
from serve_app.generation.image_input import check_input_image
from serve_app.generation.schemas import Image2ImageRequest
from serve_app.outbound import (
    BlockedDestination,
    Connector,
    FetchFailed,
    FetchTimedOut,
    FetchTooLarge,
    Resolver,
    fetch,
    system_resolver,
)

ImageRequestT = TypeVar("ImageRequestT", bound=Image2ImageRequest)
# What the fetch may spend past its own time limit: name resolution, which the fetch's
# deadline cannot interrupt (the thread finishes on its own; the client is answered).
RESOLVE_MARGIN_S = 2.0
ACCEPT = "image/png, image/jpeg"
# Fetches run in threads of their own: slow image hosts (each up to timeout_s) then never
# hold the default executor's threads, which the store's reads and writes need. Past this
# many at once they wait their turn, within their time limit.
FETCH_THREADS = 16
_executor = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="image-url")


async def fetch_input_image(request: ImageRequestT, config: AppConfig, *,
                            resolver: Resolver = system_resolver,
                            connector: Connector | None = None) -> ImageRequestT:
    """The request with its `imageUrl` fetched into `image` (and `imageUrl` cleared), the
    image checked as an uploaded one; typed 4xx errors naming `imageUrl` otherwise."""
    url = request.imageUrl
    if url is None:
        return request
    cfg, limits = config.ingress.image_url, config.limits
    try:
        get = functools.partial(fetch, url, max_bytes=limits.max_input_image_bytes,
                                timeout_s=cfg.timeout_s, max_redirects=cfg.max_redirects,
                                allow_private=cfg.allow_private, hosts=cfg.hosts,
                                resolver=resolver, connector=connector, accept=ACCEPT)
        data = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_executor, get),
                                      cfg.timeout_s + RESOLVE_MARGIN_S)
    except BlockedDestination as err:
        # The short reason: an internal name's internal address stays unsaid.
        raise ImageUrlRefused(f"imageUrl cannot be fetched: {err.short_reason}",
                              field="imageUrl") from None
    except FetchTooLarge:
        raise PayloadTooLarge(f"the image at imageUrl is larger than "
                              f"{limits.max_input_image_bytes} bytes",
                              field="imageUrl") from None
    except (FetchTimedOut, asyncio.TimeoutError):
        raise ImageUrlFailed(f"imageUrl did not give its image within {cfg.timeout_s:g} s",
                             field="imageUrl") from None
    except FetchFailed as err:
        raise ImageUrlFailed(f"imageUrl could not be fetched: {err.reason}",
                             field="imageUrl") from None
    try:
        check_input_image(data, limits)
    except (InvalidImage, PayloadTooLarge) as err:
        err.field = "imageUrl"  # the same check and message as an upload, on this field
        raise
    return request.model_copy(update={"image": data, "imageUrl": None})
