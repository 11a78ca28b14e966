"""The instruct probe of the real-model study: short factual questions, each with the answers that count as right.

Written for this project. A question counts as answered when the greedy reply, lower-cased, contains one of its
answers. The list keeps only questions that SmolLM2-135M-Instruct (Q4_1, dequantized) answers right on the
machine the study was written on; the study still measures the starting model itself and reports accuracy on the
questions it answers right there, so a machine where one flips changes the count, not the verdict.
"""

from __future__ import annotations

import re

QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the capital of Russia?", ("moscow",)),
    ("What is the capital of China?", ("beijing",)),
    ("What is the capital of Egypt?", ("cairo",)),
    ("What is the capital of Canada?", ("ottawa",)),
    ("What is the capital of Australia?", ("canberra",)),
    ("What is the capital of Greece?", ("athens",)),
    ("What is the capital of Ireland?", ("dublin",)),
    ("What is the capital of Austria?", ("vienna",)),
    ("What is the capital of Norway?", ("oslo",)),
    ("What is the capital of Sweden?", ("stockholm",)),
    ("What is the capital of Poland?", ("warsaw",)),
    ("What is the capital of India?", ("new delhi", "delhi")),
    ("What is the capital of Mexico?", ("mexico city",)),
    ("What is the capital of Kenya?", ("nairobi",)),
    ("What is the capital of South Korea?", ("seoul",)),
    ("What is the capital of Thailand?", ("bangkok",)),
    ("What is the capital of the Netherlands?", ("amsterdam",)),
    ("What is the capital of Peru?", ("lima",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("Who wrote Hamlet?", ("shakespeare",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("Who developed the theory of relativity?", ("einstein",)),
    ("Who proposed the theory of evolution by natural selection?", ("darwin",)),
    ("Who discovered penicillin?", ("fleming",)),
    ("Who formulated the laws of motion and universal gravitation?", ("newton",)),
    ("Who composed the Fifth Symphony that begins with four famous notes?", ("beethoven",)),
    ("Who wrote Pride and Prejudice?", ("austen",)),
    ("Who was the first person to walk on the Moon?", ("armstrong",)),
    ("Who invented the telephone?", ("bell",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What natural satellite orbits the Earth?", ("moon",)),
    ("What is the chemical symbol for gold?", ("au",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2", "co₂")),
    ("What gas do humans need to breathe to survive?", ("oxygen",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many months are there in a year?", ("12", "twelve")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("What is the longest river in Africa?", ("nile",)),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What is the largest desert in Africa?", ("sahara",)),
    ("On which continent is Brazil?", ("south america",)),
    ("On which continent is Egypt?", ("africa",)),
    ("What language is mainly spoken in Brazil?", ("portuguese",)),
    ("What language is mainly spoken in Mexico?", ("spanish",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of the United Kingdom?", ("pound",)),
    ("What is the currency used in most of the European Union?", ("euro",)),
    ("What is the largest mammal in the world?", ("blue whale", "whale")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What organ pumps blood through the human body?", ("heart",)),
    ("What is the main language spoken in Germany?", ("german",)),
    ("In which country are the pyramids of Giza?", ("egypt",)),
    ("In which city is the Eiffel Tower?", ("paris",)),
    ("In which country is the Great Wall?", ("china",)),
    ("In which city is the Colosseum?", ("rome",)),
    ("What force keeps us on the ground?", ("gravity",)),
    ("What is the speed of light in a vacuum, in kilometers per second, approximately?", ("300,000", "300 000",
                                                                                            "299,792", "300000")),
    ("What does CPU stand for?", ("central processing unit",)),
    ("What is the name of our galaxy?", ("milky way",)),
    ("What instrument has 88 keys?", ("piano",)),
)


def is_correct(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether the reply contains one of the accepted answers as whole words, case-insensitive ("7" does not
    match "17")."""
    reply = reply.lower()
    return any(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", reply) for answer in answers)
