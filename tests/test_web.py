"""The chat page at `/` and its two endpoints (/v1/plan, /v1/boxes), over loopback; then the page itself in a real
headless chromium (playwright driving the system browser): upload an image, see its token cost, get a streamed
answer, a second turn, and grounding boxes drawn where `qwen2vl.grounding` puts them."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from PIL import Image

from processing_fixtures import noise_image
from qwen2vl.grounding import parse_boxes
from qwen2vl.serve.config import ServerConfig
from qwen2vl.serve.protocol import ApiError, parse_request
from qwen2vl.serve.server import build_server, serve_in_thread
from test_server import data_uri

KEY = "sk-web"
REPLY = (
    "The <|object_ref_start|>cat<|object_ref_end|><|box_start|>(120,250),(480,900)<|box_end|> sits by "
    "<|object_ref_start|>two cups<|object_ref_end|><|box_start|>(500,100),(620,300)<|box_end|> and "
    "<|box_start|>(700,50),(990,400)<|box_end|>, next to a sign <|quad_start|>(10,10),(300,20),(290,200),(5,190)"
    "<|quad_end|>."
)


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    srv = build_server(
        ServerConfig(
            model=str(tiny_ckpt), api_key=KEY, served_model_name="tiny", max_model_len=1024, kv_cache_memory="256MiB"
        )
    )
    uv, srv.base = serve_in_thread(srv)
    yield srv
    uv.should_exit = True


def post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base + path, json=body, headers=headers, timeout=60)


def test_page_and_its_files_are_served(server):
    r = httpx.get(server.base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/app.js">' in r.text and "/ui/style.css" in r.text  # nothing from another host
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http" not in r.text.replace("http-equiv", "")
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server.base}/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.text) > 500
    for name in ("nope.js", "..%2Fweb.py", "index.htm"):
        assert httpx.get(f"{server.base}/ui/{name}").status_code == 404


def test_plan_endpoint_prices_each_item_as_the_processor_plans_it(server):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(300, 200, seed=1), "max_pixels": 50000}},
                {"type": "image_url", "image_url": {"url": data_uri(97, 411, seed=2)}},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    body = {"model": "tiny", "messages": messages}
    assert post(server, "/v1/plan", body, key=None).status_code == 401
    got = post(server, "/v1/plan", body).json()
    want = server.processor.plan(parse_request(body, {}).messages)
    assert [i["tokens"] for i in got["items"]] == [i.tokens for i in want.items] and want.items[0].tokens > 0
    assert [tuple(i["resized_size"]) for i in got["items"]] == [i.resized_size for i in want.items]
    assert [tuple(i["source_size"]) for i in got["items"]] == [(300, 200), (97, 411)]
    assert got["prompt_tokens"] == want.prompt_tokens and got["context"] == 1024 and got["fits"]
    # what the chat endpoint would refuse, the plan refuses with the same message
    huge = {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_uri(900, 900), "min_pixels": 800000}}],
            }
        ],
    }
    r = post(server, "/v1/plan", huge)
    assert r.status_code == 200 and not r.json()["fits"]
    assert (
        post(
            server,
            "/v1/plan",
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                    }
                ],
            },
        ).status_code
        == 400
    )


def test_boxes_endpoint_is_the_library_rule(server):
    for width, height in ((640, 480), (333, 1001)):
        got = post(server, "/v1/boxes", {"text": REPLY, "width": width, "height": height}).json()["boxes"]
        want = parse_boxes(REPLY, (width, height))
        assert len(got) == len(want) == 4
        assert [(b["label"], [tuple(p) for p in b["pixels"]]) for b in got] == [(b.label, list(b.pixels)) for b in want]
    for bad in (
        {"text": 3, "width": 1, "height": 1},
        {"text": "", "width": 0, "height": 1},
        {"text": "", "width": True, "height": 1},
        {"text": ""},
    ):
        assert post(server, "/v1/boxes", bad).status_code == 400
    assert post(server, "/v1/boxes", {"text": REPLY, "width": 9, "height": 9}, key=None).status_code == 401


def test_skip_special_tokens_is_a_strict_boolean():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(base, {}).skip_special_tokens
    assert not parse_request({**base, "skip_special_tokens": False}, {}).skip_special_tokens
    with pytest.raises(ApiError):
        parse_request({**base, "skip_special_tokens": "false"}, {})


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_chat_page_in_a_headless_browser(server, tmp_path):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (CI installs it: .ci/oracle-deps.sh)")
    from playwright.sync_api import expect, sync_playwright

    picture = tmp_path / "photo.png"
    noise_image(320, 240, seed=7).save(picture)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # CSP violations too; the one failed load expected is the key probe's 401
        page.on(
            "console", lambda m: errors.append(m.text) if m.type == "error" and "(Unauthorized)" not in m.text else None
        )
        page.goto(server.base + "/")
        page.wait_for_selector("#key-box:not([hidden])")  # the server has --api-key: the page asks for it
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        expect(page.locator("#model")).to_contain_text("tiny ·")  # locator waits: the page's CSP forbids eval

        # an image from the file picker (the same path as a drop or a paste): its cost before sending
        page.set_input_files("#file", str(picture))
        page.fill("#text", "What is in this picture?")
        expect(page.locator(".item .cost")).to_contain_text("tokens")
        want = server.processor.plan(
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": Image.open(picture)}, {"type": "text", "text": "?"}],
                }
            ]
        ).items[0]
        cost = page.text_content(".item .cost")
        assert f"320×240 → {want.resized_size[0]}×{want.resized_size[1]} · {want.tokens} tokens" == cost
        assert "of 1024 tokens" in page.text_content("#plan")

        # a streamed answer, then a second turn that carries the first
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
        assert int(page.get_attribute(".msg.assistant", "data-chunks") or 0) >= 1
        page.fill("#text", "And the colours?")
        page.click("#send")
        expect(page.locator(".msg.assistant[data-state=done]")).to_have_count(2, timeout=120_000)
        history = page.evaluate("window.qwen2vl.state.history")
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert history[0]["content"][0]["type"] == "image_url"
        assert history[2]["content"][-1]["text"] == "And the colours?"
        assert not page.query_selector(".msg.error"), page.text_content(".msg.error")

        # grounding: a known reply's boxes drawn over the image, where the library puts them
        drawn = page.evaluate(
            """async (text) => {
            const el = document.querySelectorAll('.msg.assistant')[0];
            const src = window.qwen2vl.state.history[0].content[0].image_url.url;
            await window.qwen2vl.renderBoxes(text, src, el);
            return [...el.querySelectorAll('polygon.box-shape')].map((p) => JSON.parse(p.dataset.pixels));
        }""",
            REPLY,
        )
        want_boxes = parse_boxes(REPLY, (320, 240))
        assert drawn == [[list(p) for p in b.pixels] for b in want_boxes]
        assert page.locator(".grounded svg text").all_text_contents() == ["cat", "two cups", "two cups"]
        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert errors == []
        browser.close()
    print(json.dumps({"screenshot": str(shot)}))


def test_drop_and_paste_attach_images_and_videos(server, tmp_path):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (CI installs it: .ci/oracle-deps.sh)")
    import base64

    from playwright.sync_api import expect, sync_playwright

    from qwen2vl.testing.video import encode_video, sharp_frames

    picture = tmp_path / "p.png"
    noise_image(200, 150, seed=3).save(picture)
    clip = encode_video(tmp_path / "c.mp4", sharp_frames((160, 120), 8), (160, 120), fps=4, gop=None)
    files = [
        {"name": "p.png", "type": "image/png", "data": base64.b64encode(picture.read_bytes()).decode()},
        {"name": "c.mp4", "type": "video/mp4", "data": base64.b64encode(clip.read_bytes()).decode()},
    ]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.base + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        expect(page.locator("#model")).to_contain_text("tiny ·")
        page.evaluate(
            """(files) => {
            const asFile = (f) => new File([Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0))], f.name,
                                           { type: f.type });
            const dropped = new DataTransfer();
            dropped.items.add(asFile(files[0]));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: dropped,
                                                                                  bubbles: true, cancelable: true }));
            const pasted = new DataTransfer();
            pasted.items.add(asFile(files[1]));
            document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: pasted, bubbles: true }));
        }""",
            files,
        )
        expect(page.locator(".item")).to_have_count(2)
        expect(page.locator(".item .cost").nth(1)).to_contain_text("frames")
        costs = page.locator(".item .cost").all_text_contents()
        kinds = sorted(page.evaluate("window.qwen2vl.state.draft.map((d) => d.kind)"))
        assert kinds == ["image", "video"]
        local = server.pipe.processor  # the server's own refuses local files; same sizing rules
        plan = local.plan(
            server.limits.apply(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": Image.open(picture)},
                            {"type": "video", "video": str(clip)},
                        ],
                    }
                ]
            )
        )
        order = page.evaluate("window.qwen2vl.state.draft.map((d) => d.kind)")
        by_kind = {i.kind: i for i in plan.items}
        for cost, kind in zip(costs, order):
            item = by_kind[kind]
            assert cost.endswith(f"{item.tokens} tokens") and f"→ {item.resized_size[0]}×{item.resized_size[1]}" in cost
        # a pixel budget on the image lowers its cost, as the planner says
        index = order.index("image")
        page.locator(".item input").nth(index).fill("20000")
        low = (
            server.processor.plan(
                [{"role": "user", "content": [{"type": "image", "image": Image.open(picture), "max_pixels": 20000}]}]
            )
            .items[0]
            .tokens
        )
        expect(page.locator(".item .cost").nth(index)).to_contain_text(f" {low} tokens")
        assert low < by_kind["image"].tokens
        browser.close()
