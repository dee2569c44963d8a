"""The sample medical tools: their schemas and the implementations that answer from the knowledge table
(data/knowledge.py). data/build_tool_data.py builds the tool-calling sample set with them, and the Gradio demo
(--tools sample) runs them on the calls a model makes, so what a model learns and what it is given at run time agree.

Every result is a JSON object in the language of the argument it was asked about; a call the table cannot answer
gets {"error": ...} back, as a real tool would answer, so the model sees why.
"""

import json

from medicalgpt.checkout import knowledge_table

# MedicalGPT's tool schema (name, description, parameters), kept short: every prompt carries all three.
SAMPLE_TOOLS = [
    {"name": "lookup_drug_dose", "description": "drug dose", "parameters": {
        "type": "object", "properties": {"drug": {"type": "string"}, "population": {"enum": ["adult", "child"]}},
        "required": ["drug", "population"]}},
    {"name": "find_department", "description": "department for a symptom", "parameters": {
        "type": "object", "properties": {"symptom": {"type": "string"}}, "required": ["symptom"]}},
    {"name": "recommend_exam", "description": "key exam", "parameters": {
        "type": "object", "properties": {"condition": {"type": "string"}}, "required": ["condition"]}},
]
LANGUAGES = ("en", "zh")
_NEEDED_BY = "The sample medical tools"


def _table():
    return knowledge_table(_NEEDED_BY)


def _find(rows: list[dict], key: str, value: str) -> tuple[dict, str] | None:
    """The row whose key_<lang> is value, and that language."""
    return next(((row, lang) for row in rows for lang in LANGUAGES if row[f"{key}_{lang}"] == value), None)


def lookup_drug_dose(drug: str, population: str) -> dict:
    """A drug's usual dose: an adult's from the condition it treats first-line, a child's per kilogram."""
    if population == "child":
        found = _find(_table().WEIGHT_BASED_DOSES, "drug", drug)
        if found is None:
            return {"error": f"no child dose for {drug!r}"}
        entry, lang = found
        per_kg, times = entry["mg_per_kg_per_dose"], entry["doses_per_day"]
        dose = (f"每次{per_kg}毫克/千克，每日{times}次" if lang == "zh"
                else f"{per_kg} mg/kg per dose, {times} times a day")
        return {"drug": drug, "dose": dose}
    if population != "adult":
        return {"error": f"population must be adult or child, not {population!r}"}
    found = _find(_table().CONDITIONS, "drug", drug)
    if found is None:
        return {"error": f"no adult dose for {drug!r}"}
    condition, lang = found
    return {"drug": drug, "dose": condition[f"dose_{lang}"]}


def find_department(symptom: str) -> dict:
    """Every department whose conditions list the symptom, from the whole table."""
    for lang in LANGUAGES:
        found = sorted({c[f"department_{lang}"] for c in _table().CONDITIONS if symptom in c[f"symptoms_{lang}"]})
        if found:
            return {"symptom": symptom, "departments": found}
    return {"error": f"unknown symptom {symptom!r}"}


def recommend_exam(condition: str) -> dict:
    """The key exam that confirms a condition."""
    found = _find(_table().CONDITIONS, "name", condition)
    if found is None:
        return {"error": f"unknown condition {condition!r}"}
    row, lang = found
    return {"condition": condition, "exam": row[f"exam_{lang}"]}


IMPLEMENTATIONS = {"lookup_drug_dose": lookup_drug_dose, "find_department": find_department,
                   "recommend_exam": recommend_exam}


def call_sample_tool(name: str, arguments: dict) -> dict:
    """The result of a call {"name", "arguments"} of a sample tool; a tool that is not one, or arguments its
    schema does not take, answer with an error."""
    if name not in IMPLEMENTATIONS:
        return {"error": f"unknown tool {name!r}; tools: {', '.join(IMPLEMENTATIONS)}"}
    schema = next(tool["parameters"] for tool in SAMPLE_TOOLS if tool["name"] == name)
    missing = [key for key in schema["required"] if not isinstance(arguments.get(key), str)]
    unknown = [key for key in arguments if key not in schema["properties"]]
    if missing or unknown:
        return {"error": f"{name} takes string arguments {', '.join(schema['required'])}; "
                         f"missing {missing or 'none'}, unknown {unknown or 'none'}"}
    return IMPLEMENTATIONS[name](**arguments)


def run_sample_tool(name: str, arguments: dict) -> str:
    """call_sample_tool's result as the JSON text a tool message carries."""
    return json.dumps(call_sample_tool(name, arguments), ensure_ascii=False)
