"""The evidence pack (projections/evidence.py) as a PDF for a dispute reviewer: an A4 document
(landscape, so event ids fit on one line) with the payment, its timeline as a table, the prior
payments and how to check each line against the audit trail.

Only fpdf's core fonts, which draw latin-1: every text goes through ``latin1`` first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from fpdf import FPDF
from fpdf.fonts import FontFace

from domain.money import Money

TITLE = "Dispute evidence pack"
SHORT_HASH = 16
# Characters the core fonts cannot draw, written as they can; anything else left becomes "?".
_PLAIN = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": ",", "\u201c": '"', "\u201d": '"', "\u201e": '"',
    "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u2026": "...", "\u2022": "*", "\u00a0": " ",
    "\u2009": " ", "\u202f": " ", "\u200b": "",
})
_GREY = (235, 235, 235)
_HEADINGS = FontFace(emphasis="BOLD", fill_color=_GREY)


def latin1(text: Any) -> str:
    """``text`` as the core fonts can draw it: typographic punctuation made plain, other
    characters outside latin-1 (and control characters) replaced."""
    plain = str(text).translate(_PLAIN)
    plain = "".join(ch if ch in "\n" or ch >= " " else " " for ch in plain)
    return plain.encode("latin-1", "replace").decode("latin-1")


def _money(amount_minor: Any, currency: str) -> str:
    return Money(int(amount_minor), currency).format() if amount_minor is not None else "-"


def _time(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k.replace('_', ' ')} {_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value) or "none"
    return str(value)


def _shared(prior: Mapping[str, Any]) -> str:
    """What a prior payment shares with this one, with the (masked) values."""
    said = {"phone_masked": f"phone {prior.get('phone')}", "card_brand_last4": f"card {prior.get('card')}"}
    return ", ".join(said.get(name, name.replace("_", " ")) for name in prior["shared"])


def details_text(details: Mapping[str, Any]) -> str:
    """A line's details as a reader reads them: one ``name: value`` a line, items as ``1 x name (sku)``."""
    lines = []
    for name, value in details.items():
        if name == "items" and isinstance(value, list):
            for item in value:
                lines.append(f"{item.get('quantity')} x {item.get('name')} ({item.get('sku')})")
        else:
            lines.append(f"{name.replace('_', ' ')}: {_value(value)}")
    return "\n".join(lines)


class _Document(FPDF):
    def __init__(self, pack: Mapping[str, Any]) -> None:
        super().__init__(orientation="landscape", unit="mm", format="A4")
        self.pack = pack
        self.set_margins(12, 12, 12)
        self.set_auto_page_break(auto=True, margin=18)

    def footer(self) -> None:
        self.set_y(-14)
        self.set_font("Helvetica", size=7)
        self.set_text_color(90)
        self.multi_cell(
            0, 3.2,
            latin1(f"Every timeline line names its audit row: event id, position and hash (SHA-256 over the previous"
                   f" row's hash and this row). Check the chain with `{self.pack.get('verify')}`; list the rows with"
                   f" `echotransact audit export --aggregate <payment or session id>`."
                   f"   Page {self.page_no()}/{{nb}}"),
            align="L",
        )
        self.set_text_color(0)

    def heading(self, text: str) -> None:
        self.ln(3)
        self.set_font("Helvetica", style="B", size=12)
        self.cell(0, 7, latin1(text), new_x="LMARGIN", new_y="NEXT")
        self.set_font("Helvetica", size=8)

    def table_of(self, rows: Sequence[Sequence[str]], col_widths: Sequence[float], *,
                 headings: bool = True) -> None:
        with self.table(col_widths=tuple(col_widths), text_align="LEFT", line_height=3.6, padding=1,
                        headings_style=_HEADINGS, first_row_as_headings=headings,
                        num_heading_rows=1 if headings else 0, v_align="TOP") as table:
            for cells in rows:
                row = table.row()
                for text in cells:
                    row.cell(latin1(text))


def render_pdf(pack: Mapping[str, Any]) -> bytes:
    """The pack as PDF bytes."""
    payment = pack["payment"]
    currency = payment["currency"]
    pdf = _Document(pack)
    pdf.set_title(latin1(f"{TITLE}: payment {payment['payment_id']}"))
    pdf.set_creator("EchoTransact")
    if pack.get("generated_at"):
        pdf.set_creation_date(datetime.fromisoformat(pack["generated_at"]))
    pdf.add_page()

    pdf.set_font("Helvetica", style="B", size=16)
    pdf.cell(0, 9, latin1(TITLE), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    pdf.cell(0, 5, latin1(f"Payment {payment['payment_id']}, generated {_time(pack.get('generated_at'))} UTC"),
             new_x="LMARGIN", new_y="NEXT")

    pdf.heading("Payment")
    card = payment["card"]
    pdf.table_of([
        ("Payment id", payment["payment_id"]),
        ("Session id", payment.get("session_id") or "-"),
        ("Merchant id", pack["merchant_id"]),
        ("Status", payment["status"]),
        ("Amount", _money(payment["amount_minor"], currency)),
        ("Authorized / captured / refunded", " / ".join(
            _money(payment[k], currency) for k in ("authorized_minor", "captured_minor", "refunded_minor"))),
        ("Card", f"{card['brand']} ending {card['last4']} (fingerprint: {card['fingerprint']})"),
        ("Customer phone", payment.get("customer_phone") or "-"),
        ("Order reference", payment.get("order_reference") or "-"),
        ("Voice platform and conversation", f"{payment.get('voice_platform')}, conversation"
                                            f" {payment.get('conversation_id')}"),
        ("Processor", payment.get("processor") or "-"),
        ("Created (UTC)", _time(payment.get("created_at"))),
    ], (60, 213), headings=False)

    pdf.heading("Timeline (audit trail, in position order)")
    # Widths in mm: an event id (36 characters at 7.5 pt) and a short hash each on one line.
    pdf.set_font("Helvetica", size=7.5)
    pdf.table_of(
        [("Time (UTC)", "What", "Details", "Event id", "Position", "Hash"),
         *((_time(line["at"]), line["what"], details_text(line["details"]), line["event_id"],
            str(line["position"]), (line["hash"] or "not yet chained")[:SHORT_HASH])
           for line in pack["timeline"])],
        (29, 58, 88, 55, 15, 28),
    )

    pdf.heading("Prior undisputed payments by the same customer")
    pdf.set_font("Helvetica", size=8)
    pdf.multi_cell(0, 4, latin1(f"Matched on {pack.get('prior_payments_matched_on', '-')}."),
                   new_x="LMARGIN", new_y="NEXT")
    prior = pack["prior_payments"]
    if prior:
        pdf.ln(1)
        pdf.table_of(
            [("Time (UTC)", "Payment id", "Amount", "Status", "Shared"),
             *((_time(p["at"]), p["payment_id"], _money(p["amount_minor"], p["currency"]), p.get("status", "-"),
                _shared(p)) for p in prior)],
            (34, 60, 35, 30, 114),
        )
    else:
        pdf.cell(0, 5, "None found.", new_x="LMARGIN", new_y="NEXT")

    missing = pack.get("not_recorded") or []
    if missing:
        pdf.heading("Not recorded")
        pdf.table_of([("Fact", "Why"), *((m["fact"], m["reason"]) for m in missing)], (70, 203))
    return bytes(pdf.output())
