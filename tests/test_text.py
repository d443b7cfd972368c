"""TextStream: the deltas of a stream add up to the whole text, a stop string and what follows are cut, a
tail that may grow into a stop string is held back, half a UTF-8 character is never sent."""
from tpcompile.text import TextStream, chat_prompt
from tpcompile.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def run(text: str, stop: list[str]) -> tuple[list[str], str, bool]:
    s = TextStream(TOK, stop)
    deltas = [s.add(t) for t in TOK.encode(text)]
    deltas.append(s.finish())
    return deltas, "".join(deltas), s.stopped


def test_deltas_add_up_and_stop_strings_cut():
    assert run("héllo wörld", [])[1] == "héllo wörld"
    deltas, text, stopped = run("one two STOP three", ["STOP"])
    assert text == "one two " and stopped
    deltas, text, stopped = run("a ST b STOP", ["STOP", "xyz"])
    assert text == "a ST b " and stopped
    assert run("no stop here S", ["STOP"])[1:] == ("no stop here S", False)  # held "S" released at the end


def test_no_delta_ends_inside_a_character_or_a_possible_stop():
    deltas, _, _ = run("aé€b", [])
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == "aé€b"
    deltas, _, _ = run("xxSTO", ["STOP"])
    assert deltas[:-1] == ["x", "x", "", "", ""] and deltas[-1] == "STO"


def test_chat_prompt_without_a_template():
    ids = chat_prompt(TOK, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert TOK.decode(ids) == "system: S\nuser: U\nassistant:"
