from legion.model.conversation import GCG_QUESTION, parse_answer, render_conversation, render_prompt, tag_phrase


def test_prompt_is_verbatim_llava_v1():
    prompt = render_prompt()
    assert prompt.startswith("A chat between a curious human and an artificial intelligence assistant. "
                             "The assistant gives helpful, detailed, and polite answers to the human's questions. "
                             "USER: The <im_start><image><im_end> provides an overview of the picture.\n")
    assert prompt.endswith(GCG_QUESTION + " ASSISTANT:")
    assert render_conversation("x") == prompt + " x</s>"


def test_parse_answer_keeps_unknown_angle_text():
    text = (f"ASSISTANT: Upon examining. {tag_phrase('Man' + chr(39) + 's ear.')}:The ear <b> is off."
            f"{tag_phrase('eyes')}:Uneven.</s>")
    explanation, phrases = parse_answer(text)
    assert phrases == ["Man's ear.", "eyes"]
    assert explanation == "Upon examining. Man's ear.:The ear <b> is off. eyes:Uneven."
