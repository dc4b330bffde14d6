"""Images as prompt context, end to end on the tiny checkpoint's vision tower: over HTTP (OpenAI `image_url`
data URLs, Anthropic image blocks) and gRPC (bytes), checked at the edge, and run through the encoder."""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import torch
from httpservice import Service, running
from langchain_core.messages import HumanMessage
from PIL import Image

from blockpress.runtime.adapters.langchain import ChatBlockPress
from blockpress.runtime.contracts.errors import InvalidArgument
from blockpress.runtime.contracts.jobs import JobState
from blockpress.runtime.sdk.aio import AsyncClient
from blockpress.workers import images
from blockpress.workers.engine import DiffusionEngine

pytestmark = pytest.mark.slow


def picture(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def noise(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    out = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def asking(url: str) -> list[Any]:
    parts = [{"type": "text", "text": "What color is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


@pytest.fixture
def vision_calls(tiny_engine: DiffusionEngine) -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the pixel values each vision-tower call saw."""
    calls: list[tuple[int, ...]] = []
    tower = tiny_engine.model.model.encoder.vision_tower
    hook = tower.register_forward_hook(lambda _m, args, kwargs, _out: calls.append(tuple(kwargs["pixel_values"].shape)),
                                       with_kwargs=True)  # fmt: skip
    yield calls
    hook.remove()


def client(svc: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=svc.base_url, api_key="none", max_retries=0)


async def test_an_image_url_runs_through_the_vision_tower(service: Service, vision_calls: list[Any]) -> None:
    text_only = [{"role": "user", "content": "What color is this?"}]
    async with client(service) as oai:
        plain = await oai.chat.completions.create(model="tiny-calculator", messages=text_only, max_tokens=8)  # type: ignore[arg-type]
        assert vision_calls == []
        seen = await oai.chat.completions.create(
            model="tiny-calculator", messages=asking(data_url(picture((200, 10, 10)))), max_tokens=8,
            extra_headers={"Idempotency-Key": "img-1"},
        )  # fmt: skip
    assert len(vision_calls) == 1 and vision_calls[0][0] == 1  # one image, one pass of the tower
    assert plain.usage is not None and seen.usage is not None
    # A 64x48 image is 63 soft tokens with the tiny checkpoint's processor (16-pixel patches, 3x3 pooling).
    # (The text around an image is tokenized in pieces, which may move one token at its edges.)
    assert abs(seen.usage.prompt_tokens - plain.usage.prompt_tokens - 63) <= 1
    record = await service.queue.get("img-1")
    [image] = record.spec.messages[0]["images"]  # type: ignore[index]
    assert record.state is JobState.SUCCEEDED and image["mime_type"] == "image/png"
    assert base64.b64decode(image["data"]) == picture((200, 10, 10))


async def test_an_anthropic_image_block_and_grpc_bytes(service: Service, vision_calls: list[Any]) -> None:
    jpeg = picture((10, 200, 10), "JPEG")
    block = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/jpeg", "data": base64.b64encode(jpeg).decode()},
    }
    content: Any = [block, {"type": "text", "text": "What color is this?"}]
    async with anthropic.AsyncAnthropic(base_url=service.base_url.removesuffix("/v1"), api_key="none",
                                        max_retries=0) as claude:  # fmt: skip
        message = await claude.messages.create(
            model="tiny-calculator", max_tokens=8, messages=[{"role": "user", "content": content}]
        )
    assert message.stop_reason in ("end_turn", "max_tokens") and len(vision_calls) == 1
    async with AsyncClient(service.address) as sdk:
        webp = picture((10, 10, 200), "WEBP", size=(96, 96))
        result = await sdk.generate([{"role": "user", "content": "What color?", "images": [webp]}], max_new_tokens=8)
        with pytest.raises(InvalidArgument) as refused:
            await sdk.generate([{"role": "user", "content": "?", "images": [b"GIF89a not supported"]}])
    assert result.usage.prompt_tokens > 40 and len(vision_calls) == 2  # dozens of soft tokens, plus the text
    assert (
        refused.value.field == "generation.messages[0].images[0].data" and "PNG, JPEG or WebP" in refused.value.reason
    )


async def test_bad_images_are_refused_before_queueing(
    redis_client: Any, tiny_engine: DiffusionEngine, tiny_card: Any, vision_calls: list[Any]
) -> None:
    png = picture((1, 2, 3))
    url = "messages[0].content[1].image_url.url"
    system = [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}]}]
    cases = {
        "not-an-image": (asking(data_url(b"hello, world")), url, "PNG, JPEG or WebP"),
        "truncated": (asking(data_url(png[:60])), url, "does not decode"),
        "mislabelled": (asking(data_url(png, "image/jpeg")), url, "image/png"),
        "a-url": (asking("https://example.com/cat.png"), url, "data URL"),
        "bad-base64": (asking("data:image/png;base64,@@@"), url, "base64"),
        "too-big": (asking(data_url(noise((40, 40)))), url, "limit"),
        "too-many": ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}} for _ in range(3)]}], "messages", "3 images"),
        "in-a-system-message": ([*system, {"role": "user", "content": "hi"}], "messages[0].content[0]",
                                "user messages"),
    }  # fmt: skip
    limits = {"max_images": 2, "max_image_bytes": 1500}
    async with running(redis_client, tiny_engine, tiny_card, **limits) as svc, client(svc) as oai:
        for key, (messages, param, reason) in cases.items():
            with pytest.raises(openai.BadRequestError) as bad:
                await oai.chat.completions.create(
                    model="tiny-calculator", messages=messages, extra_headers={"Idempotency-Key": key}
                )
            assert bad.value.param == param and reason in bad.value.message, key
            assert not await svc.redis_has(key), key
    assert vision_calls == []


async def test_the_langchain_adapter_sends_image_parts_over_grpc(service: Service, vision_calls: list[Any]) -> None:
    llm = ChatBlockPress(address=service.address, model="tiny-calculator", settings={"max_new_tokens": 8})
    parts = [
        {"type": "text", "text": "What color?"},
        {"type": "image_url", "image_url": {"url": data_url(picture((5, 5, 5)))}},
    ]
    answer = await llm.ainvoke([HumanMessage(content=parts)])  # type: ignore[arg-type]
    assert isinstance(answer.content, str) and len(vision_calls) == 1


def test_a_session_reuses_its_cache_only_for_the_same_images(tiny_engine: DiffusionEngine) -> None:
    def prompt(color: tuple[int, int, int]) -> tuple[list[int], images.VisionInputs]:
        message = {
            "role": "user",
            "content": "What color?",
            "images": [{"data": base64.b64encode(picture(color)).decode()}],
        }
        return images.render(tiny_engine, [message], None)

    red, red_vision = prompt((200, 0, 0))
    blue, blue_vision = prompt((0, 0, 200))
    assert red == blue and tiny_engine.model.config.image_token_id in red  # the same ids: only the pixels differ
    session = tiny_engine.new_session()
    with torch.inference_mode():
        session.attach_images(red_vision)
        assert session.prefill(red) == len(red)
        red_keys = session.cache.layers[0].keys.clone()
        assert session.prefill(red) == 0  # the same image: the cache holds it
        session.attach_images(blue_vision)
        assert session.prefill(blue) == len(blue)  # another image behind the same ids: encoded again
    # The image tokens' keys are the vision tower's: they differ between the images, the text's do not.
    [span] = blue_vision.spans
    blue_keys = session.cache.layers[0].keys
    image = slice(span.start, span.start + span.length)
    assert not torch.allclose(red_keys[:, :, image], blue_keys[:, :, image])
    assert torch.allclose(red_keys[:, :, : span.start], blue_keys[:, :, : span.start])
