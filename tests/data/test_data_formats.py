"""Readers on fixtures written as the official releases write them, and on malformed input."""

from __future__ import annotations

import json

import data_fixtures as fx
import pytest

from safe_av.data.formats import audiocaps, avsd, clotho, musicavqa, read, vqav2
from safe_av.data.records import DataError


# ------------------------------------------------------------------------------ MUSIC-AVQA
def test_musicavqa_reads_official_records(musicavqa_root):
    result = musicavqa.read(musicavqa_root, "train")
    assert [s.id for s in result.samples] == ["8", "28884", "50"]
    assert result.bad == [] and result.skipped == {"question_deleted": 1}
    s = {x.id: x for x in result.samples}
    assert s["28884"].question == "Are there piano and ukulele instruments in the video?"
    assert s["28884"].answers == ["no"] and s["28884"].question_type == "Visual/Counting"
    assert s["50"].question == "Where is the first sounding instrument?"
    assert s["50"].attributes["templ_values"] == ["first"] and s["50"].attributes["scenario"] == "Audio-Visual"
    assert s["8"].audio == str(musicavqa_root / "audio" / "00000238.wav")
    assert s["8"].image == str(musicavqa_root / "frames" / "00000238")
    assert s["8"].attributes["duration_s"] == pytest.approx(3.0)
    # 3 s AV/Counting: easy length + 1 -> medium; 7 s Visual/Counting -> hard; 12 s Temporal -> hard
    assert [s[i].difficulty for i in ("8", "28884", "50")] == ["medium", "hard", "hard"]


def test_musicavqa_annotations_at_root_and_missing_file(tmp_path):
    (tmp_path / "avqa-val.json").write_text(json.dumps(fx.MUSICAVQA_RECORDS[:1]))
    result = musicavqa.read(tmp_path, "val", probe_durations=False)
    assert len(result.samples) == 1 and result.samples[0].attributes["duration_s"] is None
    with pytest.raises(FileNotFoundError, match=r"avqa-test.json"):
        musicavqa.read(tmp_path, "test")


@pytest.mark.parametrize(
    "change,field,reason",
    [
        ({"anser": None}, "anser", "wrong type"),
        ({"question_id": [8]}, "question_id", "wrong type"),
        ({"video_id": 238}, "video_id", "wrong type"),
        ({"type": "Audio, Counting"}, "type", "expected a JSON list"),
        ({"type": '["Audio"]'}, "type", "expected a JSON list"),
        ({"type": '["Sound", "Counting"]'}, "type", "expected a JSON list"),
        ({"type": "{[1]: 2}"}, "type", "expected a JSON list"),  # literal_eval: TypeError (unhashable)
        ({"type": "[" * 100_000}, "type", "expected a JSON list"),  # RecursionError in both parsers
        ({"templ_values": "[1, 2]"}, "templ_values", "list of strings"),
        ({"templ_values": '["piano"]'}, "templ_values", "fewer values than placeholders"),
    ],
)
def test_musicavqa_malformed_entries_are_collected(tmp_path, change, field, reason):
    bad = {**fx.MUSICAVQA_RECORDS[1], **change}
    fx.write_musicavqa(tmp_path, [fx.MUSICAVQA_RECORDS[0], bad])
    result = musicavqa.read(tmp_path, "train")
    assert [s.id for s in result.samples] == ["8"]
    assert len(result.bad) == 1
    entry = result.bad[0]
    assert entry.field == field and reason in entry.reason
    assert "avqa-train.json[1]" in entry.where and f"question_id={bad['question_id']!r}" in entry.where
    assert field in str(entry)


def test_musicavqa_missing_key_non_object_and_duplicate(tmp_path):
    no_answer = {k: v for k, v in fx.MUSICAVQA_RECORDS[1].items() if k != "anser"}
    fx.write_musicavqa(tmp_path, [fx.MUSICAVQA_RECORDS[0], no_answer, "oops", fx.MUSICAVQA_RECORDS[0]])
    result = musicavqa.read(tmp_path, "train")
    assert [(b.field, b.reason) for b in result.bad] == [
        ("anser", "missing key"),
        ("<entry>", "expected a JSON object"),
        ("question_id", "duplicate question_id"),
    ]


def test_musicavqa_invalid_json_raises_naming_file(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "avqa-train.json").write_text('[{"video_id": "1",]')
    with pytest.raises(DataError, match=r"avqa-train.json: field 'json' = 'line 1 col \d+': invalid JSON"):
        musicavqa.read(tmp_path, "train")
    (tmp_path / "json" / "avqa-train.json").write_text("[" * 100_000)  # json's parser recurses
    with pytest.raises(DataError, match=r"avqa-train.json: field 'json'.*nested too deeply"):
        musicavqa.read(tmp_path, "train")


def test_musicavqa_not_a_list(tmp_path):
    fx.write_musicavqa(tmp_path, {"video_id": "x"})
    result = musicavqa.read(tmp_path, "train")
    assert result.samples == [] and result.bad[0].field == "<root>"


# ------------------------------------------------------------------------------- AudioCaps
def test_audiocaps_train_one_caption_per_clip(audiocaps_root):
    result = audiocaps.read(audiocaps_root, "train")
    assert result.bad == []
    a, b = result.samples
    assert a.id == "r1nicOVtvkQ_130" and a.answers == ["A woman talks nearby as water pours"]
    assert a.question == "" and a.question_type == "caption" and a.image is None
    assert a.attributes["duration_s"] == pytest.approx(10.0) and a.difficulty == "medium"
    assert b.answers == ["Birds chirping, then a dog barks"]  # quoted comma survives
    assert b.audio.endswith("audio/train/Y-0hkWHqhZIo.wav")  # Y-prefixed mirror name found
    assert b.difficulty == "easy"


def test_audiocaps_val_groups_five_rows(audiocaps_root):
    result = audiocaps.read(audiocaps_root, "val")
    assert [s.id for s in result.samples] == ["rqfQRErjfk8_170", "rqu8iB22I_Y_5"]
    first = result.samples[0]
    assert first.answers == [f"val caption {i}" for i in range(5)]
    assert first.attributes["audiocap_ids"] == [97151 + i for i in range(5)]


def test_audiocaps_bad_rows_and_header(tmp_path):
    (tmp_path / "train.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n1,abc,30,fine\n2,def,soon,bad start\n3,ghi,0,\n"
    )
    result = audiocaps.read(tmp_path, "train")
    assert [s.id for s in result.samples] == ["abc_30"]
    assert [(b.field, b.value) for b in result.bad] == [("start_time", "soon"), ("caption", "")]
    assert "train.csv:3" in result.bad[0].where
    (tmp_path / "val.csv").write_text("id,youtube_id,caption\n1,a,b\n")
    with pytest.raises(
        DataError, match=r"val.csv: field 'header'.*missing column\(s\) \['audiocap_id', 'start_time'\]"
    ):
        audiocaps.read(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="test.csv"):
        audiocaps.read(tmp_path, "test")


def test_csv_records_split_only_at_line_ends_and_broken_rows_are_bad_entries(tmp_path):
    """A cp1252 file (read as latin-1: its ellipsis is the byte 0x85, a line break to str.splitlines), an unquoted
    comma, an unbalanced quote and a blank line: every good row is read with its own line number, every broken one
    is a bad entry naming its line, and nothing is cut or merged silently."""
    rows = ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5",
            "a.wav,wait\x85 then,c2,c3,c4,c5",  # 0x85 in cp1252: an ellipsis, inside a caption
            "",
            "b.wav,one,two,three,four,five,six",  # an unquoted comma: 7 fields
            'c.wav,"unbalanced,c2,c3,c4,c5',  # swallows the rest of the file into one field
            "d.wav,1,2,3,4,5"]
    (tmp_path / "clotho_captions_evaluation.csv").write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    result = clotho.read(tmp_path, "evaluation", probe_durations=False)
    assert [s.id for s in result.samples] == ["a.wav"]
    assert result.samples[0].answers[0] == "wait\x85 then"
    assert [(b.where.rsplit(":", 1)[1], b.field) for b in result.bad] == [("4", "row"), ("5", "row")]
    assert result.bad[0].value == ["six"] and "7 fields, the header has 6" in result.bad[0].reason
    assert "runs over lines 5-6" in result.bad[1].reason


def test_csv_field_over_the_size_limit_is_a_data_error_naming_the_line(tmp_path):
    (tmp_path / "train.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,abc,30,fine\n"
                                        '2,def,0,"' + "x" * 200_000 + '"\n')
    with pytest.raises(DataError, match=r"train.csv: field 'csv' = 'line 3'.*malformed CSV: field larger"):
        audiocaps.read(tmp_path, "train", probe_durations=False)


# ---------------------------------------------------------------------------------- Clotho
def test_clotho_reads_quoted_names_and_five_captions(clotho_root):
    result = clotho.read(clotho_root, "train")  # alias of development
    assert result.bad == []
    assert [s.id for s in result.samples] == fx.CLOTHO_NAMES
    s = result.samples[0]
    assert s.answers == [f"Santa caption, number {i}" for i in range(1, 6)]  # stripped
    assert s.audio == str(clotho_root / "development" / "Santa Motor, 1.wav")
    assert s.attributes["duration_s"] == pytest.approx(15.5) and s.difficulty == "hard"


def test_clotho_missing_caption_is_collected(tmp_path):
    (tmp_path / "clotho_captions_evaluation.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\na.wav,1,2,3,4,5\nb.wav,1,2,,4,5\n,1,2,3,4,5\n"
    )
    result = clotho.read(tmp_path, "evaluation")
    assert [s.id for s in result.samples] == ["a.wav"]
    assert [(b.field, b.reason) for b in result.bad] == [
        ("caption_3", "missing or empty caption"),
        ("file_name", "missing or empty"),
    ]


# ------------------------------------------------------------------------------------ AVSD
def test_avsd_one_sample_per_turn_with_history(avsd_root):
    result = avsd.read(avsd_root, "train")
    assert [s.id for s in result.samples] == ["QRTUI_0", "QRTUI_1", "QRTUI_2"]
    last = result.samples[2]
    assert last.question == "does he talk ?" and last.answers == ["no he does not ."]
    assert last.attributes["history"] == [
        ["is there sound ?", "yes , a tap running ."],
        ["how many people ?", "just one man ."],
    ]
    assert last.attributes["caption"] == "a person walks into the kitchen" and last.question_type == "dialog"
    assert last.image == str(avsd_root / "frames" / "QRTUI") and last.difficulty == "medium"


def test_avsd_test_skips_undisclosed(avsd_root):
    result = avsd.read(avsd_root, "test")
    assert [s.id for s in result.samples] == ["ZZ9XY_0"] and result.skipped == {"answer undisclosed": 1}


def test_avsd_keyed_by_video_and_malformed(tmp_path):
    data = {
        "vid1": {"caption": "c", "summary": "s", "dialog": [{"question": "q?", "answer": "a."}]},
        "vid2": {"caption": "c", "dialog": [{"question": "q?"}]},
        "vid3": {"caption": "c"},
        "vid4": {"dialog": [{"question": "q?", "answer": "a."}, {"question": "  ", "answer": "b."},
                            {"question": "q?", "answer": "c."}]},
        "vid5": {"dialog": [{"question": "q?", "answer": ""}]},
        "": {"dialog": [{"question": "q?", "answer": "a."}]},  # would name the frames folder itself
    }
    (tmp_path / "avsd_val.json").write_text(json.dumps(data))
    result = avsd.read(tmp_path, "val")
    assert [s.id for s in result.samples] == ["vid1_0", "vid4_0"]
    assert [(b.field, b.reason) for b in result.bad] == [
        ("answer", "missing or not a string"),
        ("dialog", "missing or not a list of turns"),
        ("question", "empty string; the 1 later turn(s) of this dialog are dropped too"),
        ("answer", "empty string"),
        ("<video id key>", "empty video id"),
    ]
    assert result.skipped == {"turn after a malformed turn": 1}


# ---------------------------------------------------------------------------------- VQA v2
def test_vqav2_joins_questions_and_annotations(vqav2_root):
    result = vqav2.read(vqav2_root, "val")
    assert result.bad == []
    s = {x.id: x for x in result.samples}
    color = s["42000"]
    assert color.question == "What color is the bus?" and len(color.answers) == 10
    assert color.answers[0] == "red" and sorted(color.answers) == sorted(["dark red"] + ["red"] * 8 + ["maroon"])
    assert color.image == str(vqav2_root / "val2014" / "COCO_val2014_000000000042.jpg")
    assert color.audio is None and color.question_type == "other"
    assert color.attributes["question_type_vqa"] == "what color is the"
    assert (s["42001"].difficulty, s["73000"].difficulty) == ("easy", "medium")


def test_vqav2_bad_annotations(tmp_path):
    anns = json.loads(json.dumps(fx.VQA_ANNOTATIONS))
    anns["annotations"][0]["answers"] = "red"
    anns["annotations"][1]["answer_type"] = "boolean"
    del anns["annotations"][2]
    fx.write_vqav2(tmp_path, annotations=anns)
    result = vqav2.read(tmp_path, "val")
    assert result.samples == []
    assert [(b.field, b.value) for b in result.bad] == [
        ("answers", "red"),
        ("answer_type", "boolean"),
        ("annotation", None),
    ]
    assert "question_id=42000" in result.bad[0].where


def test_vqav2_missing_annotation_file(tmp_path):
    fx.write_vqav2(tmp_path)
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        vqav2.read(tmp_path, "val")


def test_read_dispatch_and_unknown_format(vqav2_root):
    assert len(read("vqav2", vqav2_root, "val").samples) == 3
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        read("coco", vqav2_root, "val")


# ------------------------------------------------------------------- consistency of the readers
def test_non_utf8_annotation_file_names_file_byte_and_position(tmp_path):
    """A non-UTF-8 byte is a DataError naming the file, the byte and where it is (not a bare UnicodeDecodeError)."""
    fx.write_musicavqa(tmp_path)
    path = tmp_path / "json" / "avqa-train.json"
    data = path.read_bytes()
    pos = data.index(b'"two"') + 1
    path.write_bytes(data[:pos] + b"\xff" + data[pos:])
    line = data[:pos].count(b"\n") + 1
    with pytest.raises(DataError) as err:
        musicavqa.read(tmp_path, "train")
    assert err.value.path == str(path) and err.value.field == "encoding"
    assert err.value.value == f"byte 0xff at position {pos} (line {line})"
    assert "not valid UTF-8" in err.value.reason


def test_vqav2_duplicates_and_empty_strings_are_bad_entries(tmp_path, caplog):
    questions = json.loads(json.dumps(fx.VQA_QUESTIONS))
    anns = json.loads(json.dumps(fx.VQA_ANNOTATIONS))
    qs = questions["questions"]
    qs.append(dict(qs[0]))  # the same question twice
    qs.append({"image_id": 73, "question": "  ", "question_id": 73001})  # empty question
    qs.append({"image_id": 73, "question": "Empty answers?", "question_id": 73002})
    qs.append({"image_id": 73, "question": "Empty target?", "question_id": 73003})
    anns["annotations"] += [
        {**anns["annotations"][2], "question_id": 73001},
        {**anns["annotations"][2], "question_id": 73002, "answers": fx.vqa_answers(["2"] * 8 + ["", ""])},
        {**anns["annotations"][2], "question_id": 73003, "multiple_choice_answer": ""},
        {**anns["annotations"][1], "multiple_choice_answer": "DUPLICATE"},  # a second annotation of 42001
    ]
    fx.write_vqav2(tmp_path, questions, anns)
    with caplog.at_level("INFO", logger="safe_av.data.formats.vqav2"):
        result = vqav2.read(tmp_path, "val")
    # two empty human answers of ten do not reject the question: they match no prediction, as officially
    assert [s.id for s in result.samples] == ["42000", "42001", "73000", "73002"]
    assert result.samples[3].answers.count("") == 2 and "1 question(s) have an empty human answer" in caplog.text
    # the front answer is the training target: an empty one is never put there, and all-empty answers are bad
    from safe_av.data.records import ReadResult

    ann = {**anns["annotations"][2], "multiple_choice_answer": "2", "answers": fx.vqa_answers([""] + ["two"] * 9)}
    answers, _, _ = vqav2._parse_annotation(ann, "x", ReadResult())
    assert answers[0] == "two" and answers.count("") == 1
    bad = ReadResult()
    assert vqav2._parse_annotation({**ann, "answers": fx.vqa_answers([""] * 10)}, "x", bad) is None
    assert bad.bad[0].reason == "every human answer is empty"
    assert result.samples[1].answers[0] == "no"  # the first annotation is used, not the later duplicate
    got = [(b.where.split("json")[-1], b.field, b.value, b.reason) for b in result.bad]
    assert got == [
        ("[annotations][6]", "question_id", 42001,
         "duplicate annotation for this question_id (the first, at [annotations][1], is used)"),
        ("[questions][3]", "question_id", 42000, "duplicate question_id (first at [questions][0])"),
        ("[questions][4] (question_id=73001)", "question", "  ", "empty string"),
        ("[questions][6] (question_id=73003)", "multiple_choice_answer", "", "empty string"),
    ]


def test_avsd_duplicate_dialog_and_turns_dropped_after_a_bad_one_are_counted(tmp_path):
    dialog = {"image_id": "VID", "dialog": [{"question": "q0?", "answer": "a0."}, {"question": "q1?", "answer": None},
                                            {"question": "q2?", "answer": "a2."}, {"question": "q3?", "answer": "a3."}]}
    data = {"dialogs": [{"image_id": "OK", "dialog": [{"question": "q?", "answer": "a."}]}, dialog,
                        {"image_id": "OK", "dialog": [{"question": "again?", "answer": "yes."}]}]}
    (tmp_path / "avsd_val.json").write_text(json.dumps(data))
    result = avsd.read(tmp_path, "val", probe_durations=False)
    assert [s.id for s in result.samples] == ["OK_0", "VID_0"]
    assert result.samples[0].question == "q?"  # the first dialog of OK is kept
    assert [(b.where.split("json")[-1], b.field, b.reason) for b in result.bad] == [
        ("[dialogs][1][dialog][1]", "answer",
         "missing or not a string; the 2 later turn(s) of this dialog are dropped too"),
        ("[dialogs][2]", "image_id", "duplicate dialog for this video (the first, at [dialogs][0], is used)"),
    ]
    assert result.skipped == {"turn after a malformed turn": 2}


def test_audiocaps_duplicated_row_is_a_bad_entry_not_a_second_caption(tmp_path):
    (tmp_path / "train.csv").write_text(
        "audiocap_id,youtube_id,start_time,caption\n1,abc,30,a dog barks\n2,def,0,rain\n1,abc,30,a dog barks\n"
    )
    result = audiocaps.read(tmp_path, "train", probe_durations=False)
    assert [(s.id, s.answers) for s in result.samples] == [("abc_30", ["a dog barks"]), ("def_0", ["rain"])]
    assert [(b.where.split("/")[-1], b.field, b.value, b.reason) for b in result.bad] == [
        ("train.csv:4", "audiocap_id", "1", "duplicate audiocap_id (first on line 2)")
    ]


def test_read_corpus_counts_what_the_readers_leave_out_on_purpose(tmp_path):
    """Deleted MUSIC-AVQA questions and questions without answers reach Corpus.skipped (metrics.json and safe eval
    report them), per dataset and reason; unanswered questions are not in the corpus."""
    from safe_av.config import DataConfig
    from safe_av.training.data import read_corpus

    fx.write_musicavqa(tmp_path / "musicavqa")
    vqa = fx.write_vqav2(tmp_path / "vqav2")
    (vqa / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(fx.VQA_QUESTIONS))
    corpus = read_corpus(DataConfig(root=str(tmp_path)), ["musicavqa", "vqav2"], {"musicavqa": "train",
                                                                                  "vqav2": "test"})
    assert corpus.skipped == {"musicavqa": {"question_deleted": 1}, "vqav2": {"no answers": 3}}
    assert {s.dataset for s in corpus.samples} == {"musicavqa"}
