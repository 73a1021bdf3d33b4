#!/usr/bin/env python3
"""Seeded generator of synthetic benchmark sources in their published formats.

    python bench/gen.py OUT_DIR --n 200000 --seed 0 [--images 64] [--split ...] [--jobs 2]

writes, into OUT_DIR:

    llava_instruct.json      LLaVA-Instruct-150k: a JSON array of {id, image, conversations}
    vqav2_questions.json     VQAv2 questions   {info, ..., questions: [{image_id, question, question_id}]}
    vqav2_annotations.json   VQAv2 annotations {info, ..., annotations: [{question_id, image_id, answers[10],
                             multiple_choice_answer, answer_type, question_type}]}
    coco_captions.json       COCO captions {info, images, licenses, annotations: [{id, image_id, caption}]}
    sharegpt.jsonl           ShareGPT text-only conversations, one {id, conversations} per line
    images/                  K procedurally drawn images (about half JPEG, half PNG) that all of the
                             above reference

Text is built from word lists and sentence templates: the templates are chosen, expanded and
filled for a whole batch of samples at once with numpy, the strings are assembled with one join
per batch, and the records are encoded with msgspec. Every source, and every batch of 4096
samples within it, draws from its own generator keyed by (seed, source, batch), so the output is
byte-identical on every run with the same arguments whatever --jobs is, and a source's content
does not depend on the other sources' counts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec
import numpy as np

SOURCES = ("llava", "vqa", "coco", "sharegpt")
DEFAULT_SPLIT = {"llava": 0.40, "vqa": 0.35, "coco": 0.10, "sharegpt": 0.15}
CHUNK = 4096  # samples per vectorized batch (and per generator key)

# Stream keys of the counter-based generators: (seed, key, batch).
K_LLAVA, K_VQA, K_COCO, K_SHAREGPT, K_IMAGES, K_IDS = 1, 2, 3, 4, 5, 6

_ENC = msgspec.json.Encoder()

# ----------------------------------------------------------------------------------------------
# Word lists
# ----------------------------------------------------------------------------------------------

NOUN = """cat dog horse bird cow sheep elephant giraffe zebra bear car bus truck train bicycle
motorcycle airplane boat table chair bench couch bed desk shelf counter cabinet laptop phone
keyboard monitor television remote clock lamp mirror umbrella kite surfboard skateboard frisbee
ball racket helmet pizza sandwich cake donut banana apple orange broccoli carrot salad plate cup
bowl bottle glass vase book backpack suitcase handbag window door fence wall floor ceiling roof
staircase balcony tree bush flower lawn field road sidewalk street crosswalk bridge building
tower house church statue fountain sign flag tent mountain hill river lake beach wave cloud sky
shadow boat pier lighthouse basket blanket pillow towel sink oven refrigerator microwave toaster
knife fork spoon tray jar candle painting poster rug curtain""".split()
PERSON = """man woman boy girl child person player skier surfer chef worker tourist rider officer
vendor athlete student photographer musician driver""".split()
ADJ = """large small tall short wide narrow old new modern vintage wooden metal plastic bright dark
busy quiet crowded empty colorful shiny rusty clean messy sunny cloudy snowy rainy cozy spacious
tiny huge heavy soft smooth rough striped dotted fresh ripe sturdy fragile elegant simple ornate
rustic urban rural calm lively cheerful worn polished distant nearby faded glossy""".split()
COLOR = "red blue green yellow white black brown gray orange pink purple silver beige teal maroon navy".split()
VING = """sitting standing walking running waiting resting smiling talking playing leaning posing
jumping skating surfing skiing relaxing looking working dancing laughing""".split()
VTING = """holding carrying eating watching throwing pushing pulling riding using cutting examining
feeding cleaning repairing painting catching wearing""".split()
VBASE = """use carry watch hold check clean adjust place move avoid enjoy share store protect prepare
visit arrange inspect""".split()
V3S = "sits stands rests hangs leans appears stretches lies waits shines".split()
PREP = ["near", "beside", "behind", "under", "above", "on", "inside", "across", "along", "around",
        "toward", "next to", "in front of", "on top of", "close to"]
PLACE = ["kitchen", "park", "street", "beach", "office", "living room", "station", "market", "field",
         "restaurant", "airport", "city", "garden", "bakery", "stadium", "harbor", "classroom",
         "library", "farm", "playground", "courtyard", "parking lot", "campsite"]
ABST = """safety balance comfort context movement composition lighting atmosphere perspective
attention weather activity environment contrast symmetry texture mood scale focus""".split()
EVENT = "trip game meal celebration competition lesson meeting performance parade picnic race ceremony".split()
CLOTH = "shirt jacket hat dress coat sweater scarf uniform helmet apron hoodie vest cap".split()
ADV = """slightly clearly probably likely carefully quietly gently mostly partially nearly quite
fairly surprisingly noticeably relatively""".split()
NUM = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "several", "2", "3",
       "4", "5", "7", "9", "11", "15", "20", "24", "30", "50", "100", "250", "1,000", "3.5", "0.75"]
YEAR = [str(y) for y in (1952, 1969, 1975, 1984, 1991, 1998, 2001, 2005, 2008, 2010, 2012, 2014,
                         2015, 2016, 2017, 2018, 2019, 2020, 2021, 2022, 2023)]
PCT = "5% 10% 12% 15% 20% 25% 30% 40% 50% 60% 75% 80% 90%".split()
MONEY = "$5 $12 $20 $3.50 $9.99 $45 $99 $150 $1,200".split()
ORD = "first second third fourth fifth last final".split()
TOPIC = ["Python", "JavaScript", "machine learning", "climate change", "the stock market", "nutrition",
         "remote work", "the Roman Empire", "photosynthesis", "blockchain", "project management",
         "customer service", "renewable energy", "social media", "quantum computing", "SQL",
         "Kubernetes", "Rust", "the French Revolution", "personal finance", "marketing",
         "data privacy", "urban planning", "meditation", "public speaking", "cloud computing",
         "supply chains", "game design", "web development", "linear algebra"]
TECH = """function variable class module server request query dataset model algorithm library error
loop list dictionary string array thread process cache index endpoint config parser database
framework container pipeline schema token compiler""".split()
ABSTG = """efficiency reliability scalability performance clarity consistency security flexibility
accuracy cost complexity readability maintainability growth productivity sustainability
transparency risk""".split()
GENRE = ["story", "poem", "essay", "email", "summary", "blog post", "cover letter", "speech", "outline",
         "report", "tweet", "haiku", "product description", "meeting agenda"]
TEXTN = "paragraph text article essay code email sentence function abstract".split()
LANGNAME = ["Python", "JavaScript", "TypeScript", "Rust", "Go", "Java", "C++", "SQL", "Bash"]
PERSONG = "developer user manager customer student teacher reader team beginner engineer author".split()
ADJG = """important useful common simple complex efficient practical reliable popular effective
flexible basic advanced specific general difficult straightforward robust modern""".split()
VBASEG = """explain describe write summarize compare list translate improve rewrite analyze optimize
debug implement design refactor outline review""".split()

_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "sheep": "sheep",
              "knife": "knives", "shelf": "shelves", "fish": "fish"}


def plural(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


EN_CLASSES: dict[str, list[str]] = {
    "NOUN": NOUN, "NOUNS": [plural(w) for w in NOUN], "PERSON": PERSON,
    "PEOPLE": [plural(w) for w in PERSON], "ADJ": ADJ, "COLOR": COLOR, "VING": VING, "VTING": VTING,
    "VBASE": VBASE, "V3S": V3S, "PREP": PREP, "PLACE": PLACE, "ABST": ABST, "EVENT": EVENT,
    "CLOTH": CLOTH, "ADV": ADV, "NUM": NUM, "YEAR": YEAR, "PCT": PCT, "MONEY": MONEY, "ORD": ORD,
    "TOPIC": TOPIC, "TECH": TECH, "ABSTG": ABSTG, "GENRE": GENRE, "TEXTN": TEXTN,
    "LANGNAME": LANGNAME, "PERSONG": PERSONG, "PERSONGS": [plural(w) for w in PERSONG],
    "ADJG": ADJG, "VBASEG": VBASEG,
}

# ----------------------------------------------------------------------------------------------
# Sentence templates. {CLASS} is a slot filled from EN_CLASSES; {A} is "a"/"an" chosen by the
# next word; the last character (. ? ! :) picks the sentence end. Templates start in lower case
# and are capitalized when rendered.
# ----------------------------------------------------------------------------------------------

EN_TEMPLATES: dict[str, list[str]] = {
    # LLaVA answers: image description and reasoning.
    "desc": [
        "the image shows {A} {ADJ} {NOUN} {PREP} {A} {ADJ} {NOUN}.",
        "in the scene, {A} {PERSON} is {VING} {PREP} the {NOUN} while {A} {PERSON} {V3S} nearby.",
        "there are {NUM} {NOUNS} {PREP} the {NOUN}, and at least {NUM} of them appear to be {COLOR}.",
        "{A} {PERSON} wearing {A} {COLOR} {CLOTH} is {VTING} {A} {NOUN}.",
        "the {NOUN} in the background looks {ADJ}, which suggests that the photo was taken in {A} {ADJ} {PLACE}.",
        "this may indicate that the {PERSON} is preparing for {A} {ADJ} {EVENT}.",
        "overall, the {ABST} of the image is {ADJ} and {ADJ}.",
        "it is important to consider the {ABST} of the {NOUNS} when {VTING} {A} {NOUN}.",
        "the {COLOR} {NOUN} is {ADV} visible {PREP} the {NOUN}.",
        "approximately {NUM} {NOUNS} can be seen {PREP} the {ADJ} {NOUN}.",
        "one possible reason for this is that the {PERSON} wants to keep the {NOUN} {ADJ}.",
        "the {PERSON} might be {VING} because the {NOUN} is {ADV} {ADJ}.",
        "additionally, {NUM} {NOUNS} are placed {PREP} the {NOUN}, creating {A} {ADJ} {ABST}.",
        "judging by the {ADJ} {NOUNS}, the photo was likely taken around {YEAR}.",
        "about {PCT} of the frame is filled by the {ADJ} {NOUN}.",
        "the {NOUN} and the {NOUN} are {ADV} {ADJ}, which adds to the {ABST} of the scene.",
        "such a setting is common in {A} {PLACE}, where people often {VBASE} their {NOUNS}.",
        "in the foreground, there is {A} {ADJ} {NOUN} with {NUM} {COLOR} {NOUNS} on it.",
        "the {PERSON} should be careful, as the {NOUN} {PREP} the {NOUN} could make it difficult to {VBASE} the {NOUN}.",
        "yes, the {NOUN} is {COLOR}.",
        "no, there is no {NOUN} {PREP} the {NOUN}.",
        "the {PEOPLE} seem to be enjoying {A} {ADJ} {EVENT} together.",
        "{A} {ADJ} {NOUN} stands out against the {COLOR} {NOUN}, drawing attention to the center of the frame.",
        "the lighting is {ADJ}, and the {NOUNS} cast long shadows across the {NOUN}.",
        "a price tag of {MONEY} is attached to the {NOUN} {PREP} the {NOUN}.",
        "the {ORD} {NOUN} from the left is {ADV} larger than the others.",
        "given the {ABST} and the {ABST}, it is likely that this is {A} {ADJ} {PLACE}.",
        "to the right, {A} {PERSON} is {VTING} {A} {COLOR} {NOUN}.",
        "the {NOUNS} are arranged in {A} {ADJ} pattern, with {NUM} rows of {NUM} each.",
        "what makes this scene interesting is the contrast between the {ADJ} {NOUN} and the {ADJ} {NOUN}.",
        "this could be {A} {ADJ} spot for {PEOPLE} who want to {VBASE} {NOUNS} and relax.",
        "the {NOUN} appears to be about {NUM} meters away from the {NOUN}.",
        "it is worth noting that the {PERSON} is not {VTING} the {NOUN}.",
        "several {PEOPLE} are gathered {PREP} the {NOUN}, and some of them are {VING}.",
        "these details suggest that the {EVENT} took place in the {ADJ} part of the {PLACE}.",
        "the {NOUN} is {ADV} {ADJ}, so the {PERSON} may need to {VBASE} it soon.",
        "what {A} {ADJ} {NOUN}!",
        "because of the {ADJ} {ABST}, the {NOUNS} look {ADV} {ADJ} in this photo.",
        "the {NOUN} on the left is {COLOR}, while the one on the right is {COLOR}.",
        "there might be {NUM} or {NUM} {NOUNS} hidden {PREP} the {NOUN}.",
        "one might ask whether the {PERSON} is {VING} for {A} {EVENT}.",
        "the overall {ABST} suggests that this photo was taken during {A} {ADJ} {EVENT}.",
        "in summary, the image captures {A} {ADJ} moment of {PEOPLE} {VING} {PREP} {A} {NOUN}.",
        "if the {PERSON} wants to {VBASE} the {NOUN}, they should first {VBASE} the {NOUN}.",
        "the {NOUN} measures roughly {NUM} by {NUM} centimeters.",
        "is the {NOUN} really {ADJ}? It is hard to say from this angle.",
    ],
    # LLaVA questions (human turns).
    "llava_q": [
        "what is the {PERSON} doing in the image?",
        "what color is the {NOUN}?",
        "how many {NOUNS} are visible in the image?",
        "what do you think is going on in this snapshot?",
        "can you describe the main features of this image for me?",
        "why might the {PERSON} be {VING} here?",
        "what is unusual about this image?",
        "where is the {NOUN} located in the picture?",
        "is the {NOUN} {ADJ} or {ADJ}?",
        "what could be the reason for the {NOUNS} being {PREP} the {NOUN}?",
        "what precautions should the {PERSON} take while {VING} {PREP} the {NOUN}?",
        "describe the following image in detail.",
        "explain the visual content of the image in great detail.",
        "what are the {NOUNS} in the image used for?",
        "what type of {NOUN} is shown in the image?",
        "what is the position of the {NOUN} relative to the {NOUN}?",
        "what can you infer about the {ABST} of this {PLACE}?",
        "how might the {PEOPLE} feel in this situation?",
        "are there any {NOUNS} {PREP} the {NOUN}?",
        "what is the main focus of this photograph?",
        "give an elaborate explanation of the image you see.",
        "what activity might the {PEOPLE} be engaged in?",
        "is there anything {ADJ} about the {NOUN}?",
        "what challenges could the {PERSON} face while {VTING} the {NOUN}?",
        "write a short story inspired by this image.",
    ],
    # ShareGPT: first sentence of a user turn.
    "sg_instr": [
        "can you {VBASEG} how {A} {TECH} works in {LANGNAME}?",
        "write {A} {ADJG} {GENRE} about {TOPIC}.",
        "what is the difference between {A} {TECH} and {A} {TECH}?",
        "please {VBASEG} the following {TEXTN} in {NUM} words.",
        "I am working on {A} {ADJG} project about {TOPIC}, and I need help with the {TECH}.",
        "{VBASEG} the main ideas of {TOPIC} for {A} {PERSONG}.",
        "how do I {VBASEG} {A} {TECH} in {LANGNAME}?",
        "give me {NUM} ideas for {A} {GENRE} about {TOPIC}.",
        "why does my {TECH} return {A} {TECH} instead of {A} {TECH}?",
        "act as {A} {PERSONG} and {VBASEG} {TOPIC} to me.",
        "what are the pros and cons of {TOPIC}?",
        "can you make it more {ADJG}?",
        "thanks! can you also {VBASEG} the {TECH}?",
        "please continue.",
        "what about {TOPIC}?",
        "is it possible to {VBASEG} the {TECH} without changing the {TECH}?",
        "summarize this in {NUM} bullet points.",
        "translate the previous answer into French.",
        "I get an error when I run the {TECH}, what should I do?",
        "explain {TOPIC} like I am five.",
    ],
    # ShareGPT: general prose (answers, and the rest of long user turns).
    "sg_prose": [
        "{TOPIC} is {A} {ADJG} topic that involves {ABSTG} and {ABSTG}.",
        "first, you should {VBASEG} the {TECH} to make sure it handles every {TECH} correctly.",
        "here is {A} {ADJG} example that shows how to {VBASEG} {A} {TECH}:",
        "in most cases, the {TECH} is responsible for the {ABSTG} of the whole {TECH}.",
        "this approach improves {ABSTG} by about {PCT}, although it may reduce {ABSTG}.",
        "{A} {PERSONG} might prefer {A} {ADJG} {TECH}, because it is easier to {VBASEG}.",
        "keep in mind that {TOPIC} has changed a lot since {YEAR}.",
        "the key idea is to {VBASEG} each {TECH} only once and reuse the result.",
        "another option is to {VBASEG} the {TECH} in a separate {TECH}.",
        "as a result, the {PERSONG} can focus on {ABSTG} instead of {ABSTG}.",
        "it is also {ADJG} to document the {TECH} so that other {PERSONGS} understand it.",
        "according to a study from {YEAR}, about {PCT} of {PERSONGS} struggle with {TOPIC}.",
        "I hope this helps!",
        "let me know if you have any other questions.",
        "for example, if the {TECH} contains {NUM} items, the {TECH} will take roughly {NUM} seconds.",
        "there are {NUM} main reasons for this.",
        "however, this depends on the {ABSTG} of your {TECH}.",
        "in short, {TOPIC} requires {ABSTG}, {ABSTG} and a lot of {ABSTG}.",
        "you can {VBASEG} the {TECH} by calling the {TECH} with a different {TECH}.",
        "the main advantage of {TOPIC} is its {ABSTG}, while its main drawback is {ABSTG}.",
        "note that the {TECH} is not thread-safe by default.",
        "to summarize, {VBASEG} the {TECH}, {VBASEG} the {TECH}, and then {VBASEG} the result.",
        "many {PERSONGS} find {TOPIC} {ADJG} at first, but it becomes {ADJG} with practice.",
        "sure, here is {A} {ADJG} {GENRE} about {TOPIC}.",
        "{A} {ADJG} way to think about it is to compare it to {A} {NOUN} {PREP} {A} {NOUN}.",
        "this will cost around {MONEY} per month for {A} {ADJG} setup.",
        "does that make sense?",
        "the {ORD} step is to {VBASEG} the {TECH}.",
        "when the {TECH} grows beyond {NUM} entries, the {ABSTG} of the {TECH} becomes {ADJG}.",
        "{PERSONGS} often {VBASEG} the {TECH} before they {VBASEG} the {TECH}.",
    ],
}

# VQAv2 questions: (template, question_type, answer_type, answer pool).
VQA_TEMPLATES: list[tuple[str, str, str, str]] = [
    ("what color is the {NOUN}?", "what color is the", "other", "colors"),
    ("what color are the {NOUNS}?", "what color are the", "other", "colors"),
    ("is the {NOUN} {ADJ}?", "is the", "yes/no", "yesno"),
    ("is this {A} {PLACE}?", "is this a", "yes/no", "yesno"),
    ("are there any {NOUNS} in the picture?", "are there", "yes/no", "yesno"),
    ("is there {A} {NOUN} in the image?", "is there a", "yes/no", "yesno"),
    ("does the {PERSON} have {A} {NOUN}?", "does the", "yes/no", "yesno"),
    ("is the {PERSON} {VING}?", "is the person", "yes/no", "yesno"),
    ("are the {NOUNS} {COLOR}?", "are the", "yes/no", "yesno"),
    ("can you see {A} {NOUN}?", "can you", "yes/no", "yesno"),
    ("is it {ADJ} outside?", "is it", "yes/no", "yesno"),
    ("do you see any {NOUNS}?", "do you", "yes/no", "yesno"),
    ("was this photo taken {PREP} {A} {PLACE}?", "was", "yes/no", "yesno"),
    ("is this photo in black and white?", "is this", "yes/no", "yesno"),
    ("how many {NOUNS} are there?", "how many", "number", "count"),
    ("how many {NOUNS} are in the photo?", "how many", "number", "count"),
    ("how many {NOUNS} are {PREP} the {NOUN}?", "how many", "number", "count"),
    ("how many {PEOPLE} are {VING}?", "how many people are", "number", "count"),
    ("what number is on the {NOUN}?", "what number is", "number", "numbers"),
    ("what is the {PERSON} holding?", "what is the person", "other", "objects"),
    ("what is on the {NOUN}?", "what is on the", "other", "objects"),
    ("what is in the {NOUN}?", "what is in the", "other", "objects"),
    ("what sport is being played?", "what sport is", "other", "sports"),
    ("what room is this?", "what room is", "other", "rooms"),
    ("where is the {NOUN}?", "where is the", "other", "locations"),
    ("what is the {NOUN} made of?", "what is the", "other", "materials"),
    ("what animal is this?", "what animal is", "other", "animals"),
    ("what time of day is it?", "what time", "other", "times"),
    ("why is the {PERSON} {VING}?", "why", "other", "reasons"),
    ("what is the {PERSON} wearing?", "what is the person", "other", "clothes"),
    ("which hand is the {PERSON} using?", "which", "other", "hands"),
    ("what is the {PERSON} doing?", "what is the person", "other", "activities"),
    ("what brand is the {NOUN}?", "what brand", "other", "brands"),
    ("what is the weather like?", "what is the weather", "other", "weather"),
    ("who is {VTING} the {NOUN}?", "who is", "other", "who"),
]
VQA_ANSWERS: dict[str, list[str]] = {
    "yesno": ["yes", "no"],
    "count": ["1", "2", "3", "0", "4", "5", "6", "7", "8", "10", "9", "12"],
    "numbers": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "15", "20", "21", "23",
                "33", "45", "50", "100", "101", "2012"],
    "colors": ["white", "black", "blue", "red", "brown", "green", "yellow", "gray", "orange", "pink",
               "silver", "purple", "white and black", "red and white", "blue and white",
               "black and white", "tan", "beige"],
    "objects": ["frisbee", "umbrella", "phone", "kite", "surfboard", "tennis racket", "baseball bat",
                "remote", "cell phone", "skateboard", "bag", "pizza", "banana", "hot dog", "teddy bear",
                "cup", "book", "laptop", "knife", "toothbrush", "ball", "glove", "camera", "leash"],
    "sports": ["tennis", "baseball", "skiing", "surfing", "soccer", "frisbee", "skateboarding",
               "snowboarding", "football", "volleyball"],
    "rooms": ["kitchen", "bathroom", "living room", "bedroom", "office", "dining room", "garage"],
    "locations": ["on table", "on wall", "in sky", "on plate", "kitchen", "beach", "street",
                  "on counter", "in water", "on shelf", "ground", "left", "right", "background",
                  "on ground", "in field", "in his hand"],
    "materials": ["wood", "metal", "plastic", "glass", "brick", "stone", "concrete", "paper",
                  "ceramic", "steel", "fabric", "leather"],
    "animals": ["dog", "cat", "horse", "giraffe", "elephant", "zebra", "cow", "sheep", "bear", "bird"],
    "times": ["daytime", "night", "morning", "afternoon", "evening", "noon", "sunset", "day"],
    "reasons": ["safety", "to eat", "for fun", "raining", "sunny", "balance", "to stay dry",
                "protection", "to play", "tired", "cold", "hot", "to catch frisbee", "it's sunny"],
    "clothes": ["hat", "helmet", "jacket", "white shirt", "black jacket", "shorts", "jeans", "wetsuit",
                "suit", "dress", "glasses", "red shirt", "uniform", "coat"],
    "hands": ["right", "left", "both"],
    "activities": ["skiing", "surfing", "eating", "sitting", "playing tennis", "skateboarding",
                   "talking on phone", "riding horse", "walking", "flying kite", "reading",
                   "standing", "cooking", "texting"],
    "brands": ["apple", "nike", "dell", "samsung", "adidas", "toyota", "honda", "coca cola", "sony",
               "none"],
    "weather": ["sunny", "cloudy", "rainy", "clear", "snowy", "overcast", "foggy"],
    "who": ["man", "woman", "boy", "girl", "child", "player", "people", "nobody", "chef"],
}

# COCO captions: one sentence, 8-20 words.
CAPTION_TEMPLATES = [
    "{A} {PERSON} is {VTING} {A} {NOUN} {PREP} the {ADJ} {PLACE}.",
    "{A} {COLOR} {NOUN} parked {PREP} {A} {ADJ} {NOUN} on a city street.",
    "{NUM} {NOUNS} sitting {PREP} {A} {NOUN} in {A} {ADJ} {PLACE}.",
    "{A} {ADJ} {NOUN} with {A} {NOUN} and {A} {NOUN} on top.",
    "{A} group of {PEOPLE} {VING} together {PREP} {A} {ADJ} {NOUN}.",
    "there is {A} {NOUN} {PREP} the {NOUN} next to {A} {COLOR} {NOUN}.",
    "{A} close up of {A} {NOUN} on {A} {COLOR} {NOUN}.",
    "{A} {PERSON} in {A} {COLOR} {CLOTH} {VTING} {A} {NOUN} at the {PLACE}.",
    "{A} {ADJ} {PLACE} filled with {NOUNS}, {NOUNS} and {A} {ADJ} {NOUN}.",
    "two {PEOPLE} are {VING} {PREP} {A} {NOUN} on {A} {ADJ} day.",
    "{A} {NOUN} that is {VING} {PREP} {A} {NOUN} near the {NOUN}.",
    "an old {NOUN} sitting on the side of {A} {ADJ} {NOUN}.",
    "{A} {PERSON} {VTING} {A} {NOUN} while {VING} {PREP} {A} {NOUN}.",
    "{A} black and white photo of {A} {NOUN} {PREP} {A} {NOUN}.",
    "several {NOUNS} and {A} {NOUN} are arranged on {A} {ADJ} {NOUN}.",
    "{A} {ADJ} {NOUN} is {VING} in the middle of {A} {ADJ} {PLACE} at night.",
    "{A} {PERSON} and {A} {PERSON} {VING} {PREP} {A} {COLOR} {NOUN} in front of {A} {NOUN}.",
    "{A} plate of food with {NOUNS}, {NOUNS} and {A} {NOUN} on {A} {ADJ} table.",
    "{A} {PERSON} riding {A} {NOUN} down {A} {ADJ} street {PREP} {A} {ADJ} {NOUN}.",
    "this is {A} picture of {A} {ADJ} {NOUN} {PREP} {A} {NOUN} and some {NOUNS}.",
]

# ShareGPT code blocks, one template per line (Python and JavaScript).
CODE_CLASSES: dict[str, list[str]] = {
    "FN": """process_data load_config parse_args compute_total fetch_items validate_input main
build_model train_step get_user update_cache render_page save_results clean_text merge_lists
find_max to_json handle_request""".split(),
    "VAR": "data items result config value count total user users text path response model df x y i n key values output buffer records".split(),
    "INT": "0 1 2 3 5 10 42 100 256 1000 1024".split(),
    "STR": ['"data.csv"', "'utf-8'", '"config.json"', "'id'", '"name"', "'/api/v1/items'", '"output.txt"'],
    "MOD": "os sys json re math random time typing collections itertools pathlib numpy pandas requests datetime".split(),
    "CLS": "Config Parser Model Client Cache Item User Pipeline".split(),
    "JFN": "fetchData handleClick parseInput renderList getUser updateState formatDate computeTotal loadItems".split(),
    "JVAR": "data items result config value count user response el list key acc state props".split(),
    "CW": "check update compute load validate normalize convert skip handle".split(),
    "CN": "input result config list cache response values counter edge case".split(),
}
CODE_TEMPLATES: dict[str, list[str]] = {
    "py_import": ["import {MOD}", "from {MOD} import {FN}", "import {MOD} as {VAR}"],
    "py_head": ["def {FN}({VAR}, {VAR}):", "def {FN}({VAR}):", "def {FN}():", "async def {FN}({VAR}):",
                "def {FN}({VAR}, {VAR}={INT}):"],
    "py_body": ["    {VAR} = {FN}({VAR})", "    {VAR} = {VAR} + {INT}",
                "    {VAR} = [{VAR} for {VAR} in {VAR} if {VAR}]", "    {VAR}.append({VAR})",
                "    {VAR}[{STR}] = {VAR}", "    print({VAR})", "    # {CW} the {CN}",
                "    if {VAR} is None:\n        return {VAR}", "    for {VAR} in range({INT}):\n        {VAR} += {INT}",
                "    with open({STR}) as {VAR}:\n        {VAR} = {VAR}.read()", "    {VAR} = {MOD}.{FN}({VAR}, {INT})",
                "    assert len({VAR}) > {INT}", "    {VAR} = dict({VAR}={VAR})", "",
                '    raise ValueError(f"bad {VAR}: {{VAR}}")'],
    "py_ret": ["    return {VAR}", "    return {VAR}, {VAR}", "    return None"],
    "js_import": ["import { {JFN} } from './{JVAR}';", "const {JVAR} = require('{JVAR}');"],
    "js_head": ["function {JFN}({JVAR}) {", "const {JFN} = async ({JVAR}) => {",
                "export function {JFN}({JVAR}, {JVAR}) {"],
    "js_body": ["  const {JVAR} = {JFN}({JVAR});", "  let {JVAR} = {INT};", "  {JVAR}.push({JVAR});",
                "  if (!{JVAR}) return {JVAR};", "  console.log({JVAR});", "  // {CW} the {CN}",
                "  {JVAR} = {JVAR}.map(({JVAR}) => {JVAR} * {INT});", "  await {JFN}({JVAR});", ""],
    "js_ret": ["  return {JVAR};"],
    "js_close": ["}"],
}

# CJK text (Chinese and Japanese) for a few ShareGPT conversations.
CJK_CLASSES: dict[str, list[str]] = {
    "ZN": """问题 方法 数据 模型 系统 用户 时间 经济 历史 文化 技术 学生 老师 公司 城市 市场 环境 程序 函数 变量
文章 图片 语言 社会 政策 产品 设计 研究 结果 原因 目标 计划 建议 过程 能力 网络 信息 健康 教育 旅行""".split(),
    "ZV": "分析 使用 解决 提高 介绍 讨论 理解 学习 实现 优化 处理 比较 描述 解释 改进 考虑 总结 检查".split(),
    "ZADJ": "重要 复杂 简单 有效 明显 基本 主要 不同 常见 具体 合理 稳定 灵活 高效".split(),
    "ZADV": "非常 比较 通常 可能 已经 逐渐 特别 更加 十分".split(),
    "ZPRON": "我们 你 他们 这个团队 用户 开发者 大家".split(),
    "ZNUM": "两 三 四 五 六 十 2 3 5 10".split(),
    "JN": """問題 方法 データ モデル システム ユーザー 時間 経済 歴史 文化 技術 学生 会社 東京 市場 環境 プログラム
関数 文章 言語 旅行 料理 天気""".split(),
    "JVM": "説明します 使います 考えます 確認します 比較します 改善します 紹介します 検討します".split(),
    "JVT": "説明して 使って 考えて 確認して 比較して 改善して 紹介して 検討して".split(),
    "JADJ": "重要な 簡単な 複雑な 便利な 新しい 大きな 有名な 基本的な".split(),
}
CJK_TEMPLATES: dict[str, list[str]] = {
    "zh_q": ["如何{ZV}{ZN}？", "请{ZV}一下{ZN}和{ZN}的区别。", "为什么{ZN}{ZADV}{ZADJ}？",
             "你能帮我{ZV}这个{ZN}吗？", "{ZN}有哪些{ZADJ}的{ZN}？", "请用{ZNUM}句话{ZV}{ZN}。"],
    "zh": ["{ZPRON}{ZADV}{ZV}{ZN}。", "{ZN}是{ZADJ}的{ZN}。", "关于{ZN}，{ZPRON}认为{ZN}{ZADV}{ZADJ}。",
           "首先，{ZPRON}需要{ZV}{ZN}；其次，{ZV}{ZN}也{ZADV}{ZADJ}。", "在{ZN}中，{ZN}和{ZN}的关系{ZADV}{ZADJ}。",
           "{ZN}的{ZN}有{ZNUM}个{ZADJ}的方面。", "总的来说，{ZV}{ZN}可以{ZV}{ZN}的{ZN}。",
           "例如，{ZPRON}可以通过{ZV}{ZN}来{ZV}{ZN}。", "这个{ZN}为什么{ZADV}{ZADJ}？",
           "{ZPRON}应该先{ZV}{ZN}，然后再{ZV}{ZN}。"],
    "ja_q": ["{JN}について{JVT}ください。", "{JN}と{JN}の違いは何ですか？", "{JN}を{JVT}もいいですか？"],
    "ja": ["{JN}について{JVM}。", "まず、{JN}を{JVT}ください。", "{JN}は{JADJ}{JN}です。",
           "{JN}を{JVT}、{JN}を{JVM}。", "つまり、{JN}が{JADJ}{JN}になります。", "{JN}はとても{JADJ}{JN}ですね。"],
}

# ----------------------------------------------------------------------------------------------
# The vectorized text engine
# ----------------------------------------------------------------------------------------------

_SLOT = re.compile(r"\{([A-Z][A-Z0-9]*)\}")
EndSpec = tuple[list[tuple[str, float]], list[tuple[str, float]]]  # (between sentences, at the end)


def _vowel_sound(word: str) -> bool:
    """Whether a word takes "an" (by its first letters; good enough for the word lists here)."""
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "eu", "one")):
        return False
    return w.startswith(("a", "e", "i", "o", "u", "hour", "honest", "8", "11 ", "18 "))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class Lang:
    """Word classes + sentence templates, rendered for whole batches with numpy.

    A template is a list of elements: literal text, a slot of a word class, the article {A}, and
    one sentence end. `render` expands a batch of template ids into element ids, fills slots with
    (Zipf-skewed) random words, picks the sentence ends (paragraph breaks in between, the final
    punctuation at the end of a text), fixes a/an, capitalizes sentence starts, and joins the
    strings of the whole batch at once."""

    def __init__(self, classes: dict[str, list[str]], templates: dict[str, list[str]],
                 ends: dict[str, EndSpec], default_end: str, cap: bool, skew: float = 1.4):
        vocab: list[str] = []
        cls_index: dict[str, int] = {}
        cstart: list[int] = []
        csize: list[int] = []
        cwords: list[float] = []
        for name, members in classes.items():
            cls_index[name] = len(cstart)
            cstart.append(len(vocab))
            csize.append(len(members))
            cwords.append(sum(len(w.split()) for w in members) / len(members))
            vocab.extend(members)
        lit: dict[str, int] = {}

        def lit_id(s: str) -> int:
            if s not in lit:
                lit[s] = len(vocab)
                vocab.append(s)
            return lit[s]

        self.a_id, self.an_id = lit_id("a "), lit_id("an ")
        end_names = list(ends)
        width = max(max(len(m), len(f)) for m, f in ends.values())
        self.end_mid_ids = np.zeros((len(ends), width), np.int64)
        self.end_mid_cum = np.ones((len(ends), width))
        self.end_fin_ids = np.zeros((len(ends), width), np.int64)
        self.end_fin_cum = np.ones((len(ends), width))
        for e, name in enumerate(end_names):
            for vids, cum, variants in ((self.end_mid_ids, self.end_mid_cum, ends[name][0]),
                                        (self.end_fin_ids, self.end_fin_cum, ends[name][1])):
                p = np.array([v[1] for v in variants], float)
                vids[e, :len(variants)] = [lit_id(v[0]) for v in variants]
                vids[e, len(variants):] = vids[e, len(variants) - 1]
                cum[e, :len(variants)] = np.cumsum(p / p.sum())
                cum[e, len(variants) - 1:] = 2.0  # never exceeded by a uniform draw
        kinds: list[int] = []  # 0 literal, 1 class slot, 2 article, 3 sentence end
        args: list[int] = []
        toff: list[int] = []
        tlen: list[int] = []
        twords: list[float] = []
        self.pools: dict[str, np.ndarray] = {}
        for pool, tlist in templates.items():
            members_ids: list[int] = []
            for t in tlist:
                members_ids.append(len(toff))
                end = t[-1] if t[-1:] in ends else default_end
                body = t[:-1] if t[-1:] in ends else t
                start, words, pos = len(kinds), 0.0, 0
                for m in _SLOT.finditer(body):
                    if m.start() > pos:
                        kinds.append(0)
                        args.append(lit_id(body[pos:m.start()]))
                        words += len(body[pos:m.start()].split())
                    pos = m.end()
                    if m.group(1) == "A":
                        kinds.append(2)
                        args.append(self.a_id)
                        words += 1
                        if body[pos:pos + 1] == " ":
                            pos += 1  # the article carries its space
                    else:
                        c = cls_index[m.group(1)]
                        kinds.append(1)
                        args.append(c)
                        words += cwords[c]
                if pos < len(body):
                    kinds.append(0)
                    args.append(lit_id(body[pos:]))
                    words += len(body[pos:].split())
                kinds.append(3)
                args.append(end_names.index(end))
                toff.append(start)
                tlen.append(len(kinds) - start)
                twords.append(words)
            self.pools[pool] = np.array(members_ids, np.int64)
        self.kind = np.array(kinds, np.int8)
        self.arg = np.array(args, np.int64)
        self.toff = np.array(toff, np.int64)
        self.tlen = np.array(tlen, np.int64)
        self.twords = np.array(twords, float)
        self.cstart = np.array(cstart, np.int64)
        self.csize = np.array(csize, np.int64)
        self.cap = cap
        self.skew = skew
        self.nvocab = len(vocab)
        table = vocab + [_cap(v) for v in vocab]
        self.table = np.array(table, dtype=object)
        self.clen = np.array([len(s) for s in table], np.int64)
        self.vowel = np.array([_vowel_sound(s) for s in table])

    def pick(self, rng: np.random.Generator, pool: str, n: int) -> np.ndarray:
        p = self.pools[pool]
        return p[rng.integers(0, len(p), n)]

    def plan(self, rng: np.random.Generator, pool: str, target: np.ndarray,
             first_pool: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Templates for texts of about `target` words each: sentences from `pool` (the first
        from `first_pool` if given) until the (nominal) word count reaches the target."""
        target = np.asarray(target, np.int64)
        if len(target) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        mean = self.twords[self.pools[pool]].mean()
        kcap = np.ceil(target / mean * 1.5).astype(np.int64) + 2
        starts = np.cumsum(kcap) - kcap
        cand = self.pick(rng, pool, int(kcap.sum()))
        if first_pool is not None:
            cand[starts] = self.pick(rng, first_pool, len(kcap))
        w = self.twords[cand]
        cs = np.cumsum(w)
        before = cs - w - np.repeat(cs[starts] - w[starts], kcap)
        keep = before < np.repeat(target, kcap)
        return cand[keep], np.add.reduceat(keep.astype(np.int64), starts)

    def render(self, rng: np.random.Generator, tmpl: np.ndarray, text_len: np.ndarray,
               cap_prob: float = 1.0) -> list[str]:
        """Texts of text_len[i] sentences each, the sentences' templates given in order."""
        tmpl = np.asarray(tmpl, np.int64)
        text_len = np.asarray(text_len, np.int64)
        if len(text_len) == 0:
            return []
        nsent = len(tmpl)
        L = self.tlen[tmpl]
        sstart = np.cumsum(L) - L
        E = int(L.sum())
        eidx = np.repeat(self.toff[tmpl] - sstart, L) + np.arange(E)
        kind = self.kind[eidx]
        ids = self.arg[eidx].copy()
        m = kind == 1
        c = ids[m]
        ids[m] = self.cstart[c] + (rng.random(len(c)) ** self.skew * self.csize[c]).astype(np.int64)
        m = kind == 3
        e = ids[m]
        u = rng.random(nsent)[:, None]
        mid = self.end_mid_ids[e, (u >= self.end_mid_cum[e]).sum(1)]
        fin = self.end_fin_ids[e, (u >= self.end_fin_cum[e]).sum(1)]
        last = np.zeros(nsent, bool)
        last[np.cumsum(text_len) - 1] = True
        ids[m] = np.where(last, fin, mid)
        a = np.flatnonzero(kind == 2)
        ids[a] = np.where(self.vowel[ids[a + 1]], self.an_id, self.a_id)
        if self.cap and cap_prob > 0:
            first = sstart if cap_prob >= 1 else sstart[rng.random(nsent) < cap_prob]
            ids[first] += self.nvocab
        tstart = np.cumsum(text_len) - text_len
        chars = np.add.reduceat(self.clen[ids], sstart)  # per sentence
        tchars = np.add.reduceat(chars, tstart)
        big = "".join(self.table[ids].tolist())
        ends = np.cumsum(tchars).tolist()
        begins = [0] + ends[:-1]
        return [big[b:e] for b, e in zip(begins, ends)]

    def text(self, rng: np.random.Generator, pool: str, target: np.ndarray,
             first_pool: str | None = None, cap_prob: float = 1.0) -> list[str]:
        tmpl, text_len = self.plan(rng, pool, target, first_pool)
        return self.render(rng, tmpl, text_len, cap_prob)


def _en_ends(para: float) -> dict[str, EndSpec]:
    """English sentence ends; `para`: how often a sentence closes a paragraph."""
    return {".": ([(". ", 1 - para), (".\n\n", para)], [(".", 1.0)]),
            "?": ([("? ", 1 - para), ("?\n\n", para)], [("?", 1.0)]),
            "!": ([("! ", 0.8), ("!\n\n", 0.2)], [("!", 1.0)]),
            ":": ([(":\n\n", 1.0)], [(":", 1.0)])}


EN_ALL = {**EN_TEMPLATES, "vqa": [t[0] for t in VQA_TEMPLATES]}
EN = Lang(EN_CLASSES, EN_ALL, ends=_en_ends(0.04), default_end=".", cap=True)  # LLaVA, VQA
EN_CHAT = Lang(EN_CLASSES, EN_ALL, ends=_en_ends(0.15), default_end=".", cap=True)  # ShareGPT
CAPTION = Lang(EN_CLASSES, {"caption": CAPTION_TEMPLATES},
               ends={".": ([(". ", 1.0)], [(".", 0.86), ("", 0.11), (" .", 0.03)])},
               default_end=".", cap=True)
CODE = Lang(CODE_CLASSES, CODE_TEMPLATES, ends={"\n": ([("\n", 1.0)], [("\n", 1.0)])},
            default_end="\n", cap=False, skew=1.2)
CJK = Lang(CJK_CLASSES, CJK_TEMPLATES,
           ends={"。": ([("。", 0.85), ("。\n\n", 0.15)], [("。", 1.0)]),
                 "？": ([("？", 0.9), ("？\n", 0.1)], [("？", 1.0)])},
           default_end="。", cap=False)


_SENTENCE_BREAK = re.compile(r"(?<=[.?!:])\s+")


def listify(text: str, numbered: bool) -> str:
    """Turns prose into an intro line, a numbered or bulleted list and maybe a closing line."""
    parts = _SENTENCE_BREAK.split(text)
    if len(parts) < 3:
        return text
    intro, items = parts[0], parts[1:]
    if intro[-1:] in (".", ":"):
        intro = intro[:-1] + ":"
    outro = ""
    if len(items) >= 5:
        outro = "\n\n" + items.pop()
    marks = [f"{k}. " for k in range(1, len(items) + 1)] if numbered else ["- "] * len(items)
    return intro + "\n" + "\n".join(m + s for m, s in zip(marks, items)) + outro


def code_blocks(rng: np.random.Generator, n: int) -> list[str]:
    """n fenced code blocks: optional import, a header, 2-24 body lines, return (and '}')."""
    if n == 0:
        return []
    js = rng.random(n) < 0.3
    imp = rng.random(n) < 0.4
    body = rng.integers(2, 25, n)
    nlines = imp + 1 + body + 1 + js  # import? + head + body + return + close?
    starts = np.cumsum(nlines) - nlines
    pos = np.arange(int(nlines.sum())) - np.repeat(starts, nlines)
    js_l = np.repeat(js, nlines)
    imp_l = np.repeat(imp, nlines).astype(np.int64)
    end_l = np.repeat(nlines, nlines) - 1
    total = len(pos)
    tmpl = np.where(js_l, CODE.pick(rng, "js_body", total), CODE.pick(rng, "py_body", total))
    heads = np.where(js_l, CODE.pick(rng, "js_head", total), CODE.pick(rng, "py_head", total))
    imps = np.where(js_l, CODE.pick(rng, "js_import", total), CODE.pick(rng, "py_import", total))
    rets = np.where(js_l, CODE.pick(rng, "js_ret", total), CODE.pick(rng, "py_ret", total))
    tmpl = np.where(pos == imp_l, heads, tmpl)
    tmpl = np.where((pos == 0) & (imp_l == 1), imps, tmpl)
    tmpl = np.where(pos == end_l - js_l, rets, tmpl)
    tmpl = np.where((pos == end_l) & js_l, CODE.pools["js_close"][0], tmpl)
    code = CODE.render(rng, tmpl, nlines)
    return [f"```{'javascript' if j else 'python'}\n{c}```" for j, c in zip(js.tolist(), code)]


# ----------------------------------------------------------------------------------------------
# Ids and images
# ----------------------------------------------------------------------------------------------

def _perm_ids(seed: int, key: int, idx: np.ndarray, modulus: int) -> np.ndarray:
    """Distinct, random-looking ids in [1, modulus] for distinct idx < modulus: an affine
    permutation of Z_modulus, its multiplier the first number past modulus / golden ratio that
    is coprime to the modulus."""
    a = int(modulus * 0.6180339887498949)
    while math.gcd(a, modulus) != 1:
        a += 1
    b = int(np.random.default_rng([seed, K_IDS, key]).integers(0, modulus))
    return np.array([(i * a + b) % modulus + 1 for i in np.asarray(idx).tolist()], np.int64)


COCO_ID_MODULUS = 1_000_000  # COCO ids are at most six digits


def image_plan(seed: int, k: int) -> list[dict[str, Any]]:
    """Names, sizes, formats and modes of the K images: even indices are JPEGs named like COCO
    train2014 files (their ids are the first COCO image ids), odd indices PNGs."""
    njpeg = (k + 1) // 2
    fids = _perm_ids(seed, K_COCO, np.arange(njpeg), COCO_ID_MODULUS).tolist()
    plan = []
    for i in range(k):
        rng = np.random.default_rng([seed, K_IMAGES, i, 0])
        w, h = (int(v) for v in rng.integers(200, 1025, 2))
        if i % 2 == 0:
            fid = fids[i // 2]
            mode = "L" if rng.random() < 0.06 else "RGB"
            plan.append({"index": i, "name": f"COCO_train2014_{fid:012d}.jpg", "coco_id": fid, "w": w,
                         "h": h, "format": "JPEG", "mode": mode})
        else:
            r = rng.random()
            mode = "RGB" if r < 0.6 else ("RGBA" if r < 0.9 else "L")
            plan.append({"index": i, "name": f"synth_{i:04d}.png", "coco_id": None, "w": w, "h": h,
                         "format": "PNG", "mode": mode})
    return plan


def draw_image(seed: int, spec: dict[str, Any], out: Path) -> int:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, K_IMAGES, spec["index"], 1])
    w, h = spec["w"], spec["h"]
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    a = rng.uniform(0, 2 * np.pi)
    t = (xs * np.float32(np.cos(a)) + ys * np.float32(np.sin(a))) * np.float32(0.35) + np.float32(0.5)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    gh, gw = (int(v) for v in rng.integers(2, 9, 2))
    grid = (rng.standard_normal((gh, gw, 3)) * 40 + 128).clip(0, 255).astype(np.uint8)
    img += np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float32) - 128
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 14))):
        kind = int(rng.integers(0, 4))
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == 2:
            pts = [(int(x), int(y)) for x, y in zip(rng.integers(0, w, 5), rng.integers(0, h, 5))]
            draw.polygon(pts, fill=color)
        else:
            draw.line([x0, y0, x1, y1], fill=color, width=int(rng.integers(1, 12)))
    arr = np.asarray(pil, np.int16)
    if spec["format"] == "JPEG":  # sensor-like grain; PNGs stay smooth (and compress)
        arr = arr + rng.integers(-8, 9, (h, w, 1), dtype=np.int16)
    pil = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if spec["mode"] == "L":
        pil = pil.convert("L")
    elif spec["mode"] == "RGBA":
        r2 = (xs - np.float32(rng.uniform(-0.5, 0.5))) ** 2 + (ys - np.float32(rng.uniform(-0.5, 0.5))) ** 2
        alpha = (255 * np.clip(1.3 - r2, 0, 1)).astype(np.uint8)
        pil = Image.fromarray(np.dstack([np.asarray(pil), alpha]), "RGBA")
    path = out / spec["name"]
    if spec["format"] == "JPEG":
        pil.save(path, "JPEG", quality=int(rng.integers(75, 96)))
    else:
        pil.save(path, "PNG", compress_level=3)
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

class JsonArrayWriter:
    """Writes `prefix [records, ...] suffix`, one encoded batch at a time."""

    def __init__(self, path: Path, prefix: bytes = b"", suffix: bytes = b""):
        self.f = open(path, "wb")
        self.f.write(prefix + b"[")
        self.suffix = suffix
        self.first = True

    def write(self, records: list[Any]) -> None:
        if records:
            body = _ENC.encode(records)[1:-1]
            self.f.write(body if self.first else b"," + body)
            self.first = False

    def close(self) -> None:
        self.f.write(b"]" + self.suffix)
        self.f.close()


def _chunks(n: int) -> list[tuple[int, int, int]]:
    return [(c, lo, min(CHUNK, n - lo)) for c, lo in enumerate(range(0, n, CHUNK))]


def _word_targets(rng: np.random.Generator, n: int, median: float, sigma: float,
                  lo: float, hi: float) -> np.ndarray:
    return np.clip(rng.lognormal(math.log(median), sigma, n), lo, hi).astype(np.int64)


def gen_llava(out: Path, n: int, seed: int, images: list[dict[str, Any]]) -> int:
    """LLaVA-Instruct-150k: 1-5 rounds; `<image>` once, in the first human turn."""
    names = [f"images/{s['name']}" for s in images]
    w = JsonArrayWriter(out / "llava_instruct.json")
    for c, lo, m in _chunks(n):
        rng = np.random.default_rng([seed, K_LLAVA, c])
        rounds = rng.choice(np.arange(1, 6), m, p=[0.45, 0.15, 0.15, 0.13, 0.12])
        turns = int(rounds.sum())
        human = EN.render(rng, EN.pick(rng, "llava_q", turns), np.ones(turns, np.int64))
        gpt = EN.text(rng, "desc", _word_targets(rng, turns, 120, 0.45, 55, 265))
        for t in np.flatnonzero(rng.random(turns) < 0.12).tolist():
            gpt[t] = listify(gpt[t], numbered=bool(t % 2))
        img = rng.integers(0, len(names), m).tolist()
        image_last = (rng.random(m) < 0.2).tolist()
        ids = _perm_ids(seed, K_LLAVA, np.arange(lo, lo + m), 10**12 - 1).tolist()
        recs, t = [], 0
        for i in range(m):
            conv = []
            for r in range(int(rounds[i])):
                q = human[t]
                if r == 0:
                    q = q + "\n<image>" if image_last[i] else "<image>\n" + q
                conv.append({"from": "human", "value": q})
                conv.append({"from": "gpt", "value": gpt[t]})
                t += 1
            recs.append({"id": f"{ids[i]:012d}", "image": names[img[i]], "conversations": conv})
        w.write(recs)
    w.close()
    return n


VQA_QTYPE = [t[1] for t in VQA_TEMPLATES]
VQA_ATYPE = [t[2] for t in VQA_TEMPLATES]
_ANS_POOLS = list(VQA_ANSWERS)
ANS_VOCAB = [a for p in _ANS_POOLS for a in VQA_ANSWERS[p]]
ANS_START = np.cumsum([0] + [len(VQA_ANSWERS[p]) for p in _ANS_POOLS])[:-1]
ANS_SIZE = np.array([len(VQA_ANSWERS[p]) for p in _ANS_POOLS])
VQA_POOL = np.array([_ANS_POOLS.index(t[3]) for t in VQA_TEMPLATES])
VQA_INFO = {"description": "Synthetic VQAv2-style data generated by mmrecipe bench/gen.py",
            "version": "2.0", "year": 2017, "contributor": "bench/gen.py"}
VQA_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "Creative Commons Attribution 4.0 International License"}


def gen_vqa(out: Path, n: int, seed: int, images: list[dict[str, Any]]) -> int:
    """VQAv2: questions and annotations in two files, joined on question_id; image_id is the
    COCO id of one of the JPEGs (images/COCO_train2014_{image_id:012d}.jpg)."""
    coco_ids = [s["coco_id"] for s in images if s["coco_id"] is not None]
    head = {"info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": VQA_LICENSE,
            "data_subtype": "train2014"}
    qw = JsonArrayWriter(out / "vqav2_questions.json", _ENC.encode(head)[:-1] + b',"questions":', b"}")
    aw = JsonArrayWriter(out / "vqav2_annotations.json",
                         _ENC.encode({"info": VQA_INFO, "license": VQA_LICENSE, "data_subtype": "train2014",
                                      "data_type": "mscoco"})[:-1] + b',"annotations":', b"}")
    conf_names = ["yes", "maybe", "no"]
    vqa_pool = EN.pools["vqa"]
    for c, lo, m in _chunks(n):
        rng = np.random.default_rng([seed, K_VQA, c])
        tk = rng.integers(0, len(VQA_TEMPLATES), m)
        questions = EN.render(rng, vqa_pool[tk], np.ones(m, np.int64))
        pool = VQA_POOL[tk]
        start, size = ANS_START[pool][:, None], ANS_SIZE[pool][:, None]
        major = start + (rng.random((m, 1)) ** 1.5 * size).astype(np.int64)
        other = start + rng.integers(0, 1 << 30, (m, 10)) % size
        agree = 1.0 - rng.random((m, 1)) ** 3 * 0.6
        ans = np.where(rng.random((m, 10)) < agree, major, other)
        counts = (ans[:, :, None] == ans[:, None, :]).sum(2)
        mc = ans[np.arange(m), counts.argmax(1)].tolist()
        conf = np.searchsorted([0.9, 0.97], rng.random((m, 10)), side="right").tolist()
        img = rng.integers(0, len(coco_ids), m).tolist()
        qids = _perm_ids(seed, K_VQA, np.arange(lo, lo + m), 10**9 - 1).tolist()
        ans_l, tk_l = ans.tolist(), tk.tolist()
        qrecs, arecs = [], []
        for i in range(m):
            iid, qid = coco_ids[img[i]], qids[i]
            qrecs.append({"image_id": iid, "question": questions[i], "question_id": qid})
            arecs.append({
                "question_id": qid, "image_id": iid,
                "answers": [{"answer": ANS_VOCAB[a], "answer_confidence": conf_names[cf], "answer_id": k + 1}
                            for k, (a, cf) in enumerate(zip(ans_l[i], conf[i]))],
                "multiple_choice_answer": ANS_VOCAB[mc[i]],
                "answer_type": VQA_ATYPE[tk_l[i]],
                "question_type": VQA_QTYPE[tk_l[i]],
            })
        qw.write(qrecs)
        aw.write(arecs)
    qw.close()
    aw.close()
    return n


COCO_INFO = {"description": "Synthetic COCO-captions-style data generated by mmrecipe bench/gen.py",
             "url": "http://mscoco.org", "version": "1.0", "year": 2014, "contributor": "bench/gen.py",
             "date_created": "2015-01-27 09:11:52.357475"}
COCO_LICENSES = [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"}]


def gen_coco(out: Path, n: int, seed: int, images: list[dict[str, Any]]) -> tuple[int, int]:
    """COCO captions: n captions over about n/5 image entries (5-7 captions each, in shuffled
    order). The first entries are the JPEG files themselves (id = the digits of file_name);
    further entries reuse those files under their own ids."""
    jpegs = [s for s in images if s["coco_id"] is not None]
    rng = np.random.default_rng([seed, K_COCO, 0])
    per = rng.choice([5, 6, 7], n // 5 + 2, p=[0.88, 0.09, 0.03])
    cum = np.cumsum(per)
    nimg = int(np.searchsorted(cum, n)) + 1 if n else 0
    per = per[:nimg].copy()
    if nimg:
        per[-1] -= int(cum[nimg - 1] - n)
    nimg = max(nimg, len(jpegs))  # every JPEG appears (some with no caption when n is small)
    if nimg > COCO_ID_MODULUS:
        raise SystemExit(f"too many COCO images ({nimg}); lower --n or the coco share")
    ids = _perm_ids(seed, K_COCO, np.arange(nimg), COCO_ID_MODULUS).tolist()
    dates = rng.integers(0, 86400 * 28, nimg).tolist()
    img_recs = []
    for j in range(nimg):
        s = jpegs[j % len(jpegs)]
        d = dates[j]
        img_recs.append({
            "license": 4, "file_name": s["name"],
            "coco_url": f"http://images.cocodataset.org/train2014/{s['name']}",
            "height": s["h"], "width": s["w"],
            "date_captured": f"2013-11-{d // 86400 + 1:02d} {d // 3600 % 24:02d}:{d // 60 % 60:02d}:{d % 60:02d}",
            "flickr_url": f"http://farm{j % 9 + 1}.staticflickr.com/synthetic/{ids[j]}.jpg",
            "id": ids[j],
        })
    owner = rng.permutation(np.repeat(np.arange(len(per)), per)).tolist() if n else []
    prefix = (_ENC.encode({"info": COCO_INFO, "images": img_recs, "licenses": COCO_LICENSES})[:-1]
              + b',"annotations":')
    w = JsonArrayWriter(out / "coco_captions.json", prefix, b"}")
    for c, lo, m in _chunks(n):
        crng = np.random.default_rng([seed, K_COCO, c + 1])
        caps = CAPTION.render(crng, CAPTION.pick(crng, "caption", m), np.ones(m, np.int64), cap_prob=0.93)
        aids = _perm_ids(seed, K_COCO + 100, np.arange(lo, lo + m), 10**7 - 1).tolist()
        w.write([{"image_id": ids[owner[lo + i]], "id": aids[i], "caption": caps[i]} for i in range(m)])
    w.close()
    return n, nimg


_B62 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)


def gen_sharegpt(out: Path, n: int, seed: int, images: list[dict[str, Any]]) -> int:
    """ShareGPT: 1-6 rounds of text; ~20% coding conversations with fenced code blocks, ~7% in
    Chinese or Japanese, answers of lognormal length (some past 500 words), lists."""
    enc = msgspec.json.Encoder()
    with open(out / "sharegpt.jsonl", "wb") as f:
        for c, lo, m in _chunks(n):
            rng = np.random.default_rng([seed, K_SHAREGPT, c])
            rounds = rng.choice(np.arange(1, 7), m, p=[0.35, 0.2, 0.15, 0.12, 0.1, 0.08])
            kind_c = np.searchsorted([0.05, 0.07, 0.27], rng.random(m), side="right")  # zh ja code en
            kind = np.repeat(kind_c, rounds)
            turns = len(kind)
            hum: list[str] = [""] * turns
            gpt: list[str] = [""] * turns
            lat = np.flatnonzero(kind >= 2)
            # language, turns, sentence pool, first sentence of a user turn, lognormal lengths
            # (median, sigma, min, max) of user and assistant turns, in words (CJK: phrases)
            for lang, idx, pool, first, hlen, glen in (
                (EN_CHAT, lat, "sg_prose", "sg_instr", (18, 1.1, 3, 1500), (140, 0.85, 5, 2500)),
                (CJK, np.flatnonzero(kind == 0), "zh", "zh_q", (6, 0.8, 1, 300), (40, 0.8, 2, 1200)),
                (CJK, np.flatnonzero(kind == 1), "ja", "ja_q", (6, 0.8, 1, 300), (40, 0.8, 2, 1200)),
            ):
                htexts = lang.text(rng, pool, _word_targets(rng, len(idx), *hlen), first)
                gtexts = lang.text(rng, pool, _word_targets(rng, len(idx), *glen))
                for t, h, g in zip(idx.tolist(), htexts, gtexts):
                    hum[t], gpt[t] = h, g
            lists = lat[rng.random(len(lat)) < 0.3].tolist()
            numbered = (rng.random(len(lists)) < 0.6).tolist()
            for t, num in zip(lists, numbered):
                gpt[t] = listify(gpt[t], num)
            code_t = np.flatnonzero((kind == 2) & (rng.random(turns) < 0.7))
            outro = EN_CHAT.text(rng, "sg_prose", _word_targets(rng, len(code_t), 30, 0.7, 5, 200))
            has_outro = (rng.random(len(code_t)) < 0.6).tolist()
            for t, block, o, ho in zip(code_t.tolist(), code_blocks(rng, len(code_t)), outro, has_outro):
                gpt[t] = gpt[t] + "\n\n" + block + ("\n\n" + o if ho else "")
            code_h = np.flatnonzero((kind == 2) & (rng.random(turns) < 0.25))
            for t, block in zip(code_h.tolist(), code_blocks(rng, len(code_h))):
                hum[t] = hum[t] + "\n\n" + block
            # ids like "QWJhYvA_0": a permutation of the row index in base 62, plus a part number
            v = _perm_ids(seed, K_SHAREGPT, np.arange(lo, lo + m), 62**7 - 1) - 1
            digits = np.empty((m, 7), np.uint8)
            for d in range(6, -1, -1):
                digits[:, d] = _B62[v % 62]
                v //= 62
            raw = digits.tobytes().decode("ascii")
            part = rng.choice(4, m, p=[0.7, 0.15, 0.1, 0.05]).tolist()
            recs, t = [], 0
            for i in range(m):
                conv = []
                for _ in range(int(rounds[i])):
                    conv.append({"from": "human", "value": hum[t]})
                    conv.append({"from": "gpt", "value": gpt[t]})
                    t += 1
                recs.append({"id": f"{raw[7 * i:7 * i + 7]}_{part[i]}", "conversations": conv})
            f.write(enc.encode_lines(recs))
    return n


def gen_images(out: Path, seed: int, plan: list[dict[str, Any]]) -> int:
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    keep = {s["name"] for s in plan}
    for p in img_dir.iterdir():  # stale files of an earlier run with another --images
        if p.name not in keep and re.fullmatch(r"COCO_train2014_\d{12}\.jpg|synth_\d{4}\.png", p.name):
            p.unlink()
    # Two threads: numpy and Pillow's encoders release the GIL; every image has its own generator.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return sum(pool.map(lambda s: draw_image(seed, s, img_dir), plan))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def split_counts(n: int, split: dict[str, float]) -> dict[str, int]:
    """Exact counts summing to n: floor of each share, the rest by largest remainder."""
    total = sum(split.values())
    exact = {k: n * split.get(k, 0.0) / total for k in SOURCES}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    order = sorted(SOURCES, key=lambda k: (-(exact[k] - counts[k]), SOURCES.index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def parse_split(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in SOURCES:
            raise argparse.ArgumentTypeError(f"bad split entry '{part}': expected NAME=WEIGHT, NAME one of {', '.join(SOURCES)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad weight in '{part}'") from None
        if not math.isfinite(out[name]) or out[name] < 0:
            raise argparse.ArgumentTypeError(f"weight must be a finite number >= 0 in '{part}'")
    if sum(out.values()) <= 0:
        raise argparse.ArgumentTypeError("split weights must not all be zero")
    return out


def _run(task: tuple[str, str, int, int, list[dict[str, Any]]]) -> tuple[str, Any, float]:
    name, out, n, seed, plan = task
    t0 = time.perf_counter()
    fn: dict[str, Callable[..., Any]] = {"llava": gen_llava, "vqa": gen_vqa, "coco": gen_coco,
                                         "sharegpt": gen_sharegpt}
    if name == "images":
        result: Any = gen_images(Path(out), seed, plan)
    else:
        result = fn[name](Path(out), n, seed, plan)
    return name, result, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    default = ",".join(f"{k}={v:g}" for k, v in DEFAULT_SPLIT.items())
    ap = argparse.ArgumentParser(
        prog="gen.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Generate seeded synthetic benchmark sources in their published formats:\n"
            "  llava_instruct.json     LLaVA-Instruct-150k conversations (image + 1-5 rounds)\n"
            "  vqav2_questions.json    VQAv2 questions        } joined on question_id;\n"
            "  vqav2_annotations.json  VQAv2 annotations (10) } image_id = a COCO id of images/\n"
            "  coco_captions.json      COCO captions (images + annotations, ~5 per image)\n"
            "  sharegpt.jsonl          ShareGPT text-only chats (code, CJK, long answers)\n"
            "  images/                 --images K procedural images, half JPEG, half PNG\n"
            "Output is byte-identical for the same arguments."),
        epilog=(
            "--n counts samples: LLaVA conversations + VQA questions + COCO captions +\n"
            "ShareGPT conversations. It is split by --split (weights, normalized; exact counts by\n"
            f"largest remainder). The default, {default}, is a\n"
            "LLaVA-1.5-like mix: multimodal conversations, then short-answer VQA, captions\n"
            "(about 5 per COCO image entry) and text-only chats. Sources left out of --split\n"
            "get 0 samples (their files are still written, empty)."),
    )
    ap.add_argument("out_dir", type=Path, help="output folder (created if missing; files are overwritten)")
    ap.add_argument("--n", type=int, default=200_000, help="total samples (default 200000)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    ap.add_argument("--images", type=int, default=64, help="number of image files (default 64)")
    ap.add_argument("--split", type=parse_split, default=dict(DEFAULT_SPLIT),
                    help=f"per-source weights (default {default})")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (default min(2, CPUs)); does not change the output")
    args = ap.parse_args(argv)
    if args.n < 0 or args.images < 1 or args.seed < 0 or args.jobs < 1:
        ap.error("--n and --seed must be >= 0, --images and --jobs >= 1")

    t0 = time.perf_counter()
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    counts = split_counts(args.n, args.split)
    plan = image_plan(args.seed, args.images)
    # Biggest first, so that two workers finish together.
    tasks = [(name, str(out), counts.get(name, 0), args.seed, plan)
             for name in ("llava", "sharegpt", "vqa", "images", "coco")]
    if args.jobs == 1:
        results = [_run(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_run, tasks))
    by = {name: (res, secs) for name, res, secs in results}
    total = time.perf_counter() - t0

    def size(name: str) -> int:
        return (out / name).stat().st_size

    rows = [
        ("llava_instruct.json", f"{counts['llava']} conversations", size("llava_instruct.json"), by["llava"][1]),
        ("vqav2_questions.json", f"{counts['vqa']} questions", size("vqav2_questions.json"), by["vqa"][1]),
        ("vqav2_annotations.json", f"{counts['vqa']} annotations", size("vqav2_annotations.json"), None),
        ("coco_captions.json", f"{by['coco'][0][0]} captions, {by['coco'][0][1]} images",
         size("coco_captions.json"), by["coco"][1]),
        ("sharegpt.jsonl", f"{counts['sharegpt']} conversations", size("sharegpt.jsonl"), by["sharegpt"][1]),
        ("images/", f"{len(plan)} files ({(len(plan) + 1) // 2} JPEG, {len(plan) // 2} PNG)",
         by["images"][0], by["images"][1]),
    ]
    print(f"{out}: n={args.n} seed={args.seed} images={args.images} jobs={args.jobs}")
    for name, what, nbytes, secs in rows:
        t = f"{secs:6.2f} s" if secs is not None else "   (with questions)"
        print(f"  {name:24s} {what:32s} {nbytes / 1e6:9.1f} MB  {t}")
    print(f"  {'total':24s} {args.n:<32d} {sum(r[2] for r in rows) / 1e6:9.1f} MB  {total:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
