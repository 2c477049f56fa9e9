"""The OpenAI features clients use, through the official ``openai`` client against the real server on
loopback: usage in the last streamed chunk, max_completion_tokens, message names, content as a list
of text parts, the developer role, and retrieving a model by id."""

import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
openai = pytest.importorskip("openai")

from serving import complete, mdm, post, runs, statuses_documented  # noqa: E402,F401

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]


@pytest.fixture(scope="module")
def client(mdm):
    return openai.OpenAI(base_url=mdm + "/v1", api_key="unused")


def chat_text(client, messages, **options):
    res = client.chat.completions.create(model="mdm", messages=messages, max_tokens=8, seed=3, **options)
    return res.choices[0].message.content


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_options_include_usage_adds_a_last_chunk_with_the_usage(client, kind):
    if kind == "chat":
        create, options = client.chat.completions.create, {"messages": CHAT}
    else:
        create, options = client.completions.create, {"prompt": ["ROMEO.", "KING."]}
    options.update(model="mdm", max_tokens=8, n=2, seed=5)
    answer = create(**options)
    chunks = list(create(**options, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    assert all(c.usage is None and c.choices for c in chunks[:-1])
    plain = list(create(**options, stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # without the option: no usage chunk


def test_stream_options_need_stream(mdm):
    res = post(mdm, {"model": "mdm", "prompt": "x", "stream_options": {"include_usage": True}})
    assert res.status_code == 400 and res.json()["error"]["param"] == "stream_options"


def test_max_completion_tokens(client, mdm):
    res = client.chat.completions.create(model="mdm", messages=CHAT, max_completion_tokens=6, seed=2)
    same = client.chat.completions.create(model="mdm", messages=CHAT, max_tokens=6, seed=2)
    assert res.choices[0].message.content == same.choices[0].message.content
    assert res.usage.completion_tokens <= 6
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model="mdm", messages=CHAT, max_completion_tokens=6, max_tokens=5)
    res = post(mdm, {"model": "mdm", "messages": CHAT, "max_completion_tokens": 49}, "/v1/chat/completions")
    assert res.status_code == 400 and res.json()["error"]["param"] == "max_completion_tokens"


def test_message_name_is_part_of_the_prompt(client, mdm):
    named = chat_text(client, [{"role": "user", "name": "Romeo", "content": "Speak."}])
    expected = complete(mdm, prompt="User (Romeo): Speak.\nAssistant:", max_tokens=8, seed=3)["choices"][0]["text"]
    assert named == expected
    with pytest.raises(openai.BadRequestError, match="messages"):
        chat_text(client, [{"role": "user", "name": "two words", "content": "Speak."}])


def test_content_as_a_list_of_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Who art"}, {"type": "text", "text": "thou?"}]}]
    assert chat_text(client, parts) == chat_text(client, [{"role": "user", "content": "Who art\nthou?"}])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError, match="messages"):
        chat_text(client, [{"role": "user", "content": [{"type": "text", "text": "Look:"}, image]}])


def test_developer_role_is_the_system_role(client):
    developer = [{"role": "developer", "content": "Be brief."}, CHAT[1]]
    assert chat_text(client, developer) == chat_text(client, CHAT)


def test_retrieve_a_model(client):
    model = client.models.retrieve("mdm")
    assert model.id == "mdm" and model.object == "model" and model.owned_by == "unmask"
    assert model.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.models.retrieve("gpt-4")
