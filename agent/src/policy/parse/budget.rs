//! `budgets:`: a daily token budget per workload, keyed by the workload's
//! name.

use serde::de::{self, MapAccess};

use super::{Ctx, Fields, Keys, Many, One, Parse, fail, request::ProviderP};
use crate::policy::Budget;

pub(crate) const BUDGET: Fields = Fields {
    what: "in a budget",
    known: &["tokens_per_day", "providers"],
    later: &[],
    instead: &[
        ("tokens", "write `tokens_per_day:`"),
        ("daily_tokens", "write `tokens_per_day:`"),
        ("max_tokens", "write `tokens_per_day:`"),
        (
            "tokens_per_hour",
            "a budget counts per UTC day: write `tokens_per_day:`",
        ),
        (
            "provider",
            "write `providers:`, which takes one name or a list",
        ),
        (
            "models",
            "a budget counts the calls to every model; to allow some models only, write \
             `limits: { models: [...] }` in a rule",
        ),
    ],
};

/// On the second reading: the error for a budget keyed by `name`, if no
/// workload has that name.
pub(super) fn workload_error(ctx: &Ctx, name: &str) -> Result<(), String> {
    let Some(names) = &ctx.names else {
        return Ok(());
    };
    if names.workloads.iter().any(|w| w == name) {
        return Ok(());
    }
    let defined = if names.workloads.is_empty() {
        "none".to_string()
    } else {
        names.workloads.join(", ")
    };
    Err(format!(
        "budgets name workload `{name}`, which is not defined under workloads:; defined: \
         {defined}; a budget is keyed by the name of the workload whose LLM calls it counts"
    ))
}

/// One workload's budget.
pub(super) struct BudgetKeys {
    workload: String,
    tokens_per_day: Option<u64>,
    providers: Option<Vec<&'static str>>,
}

impl BudgetKeys {
    pub(super) fn new(workload: &str) -> BudgetKeys {
        BudgetKeys {
            workload: workload.to_string(),
            tokens_per_day: None,
            providers: None,
        }
    }
}

impl<'de> Keys<'de> for BudgetKeys {
    type Value = Budget;

    fn fields(&self) -> &'static Fields {
        &BUDGET
    }

    fn expecting(&self) -> String {
        "a budget: a mapping with tokens_per_day, and optionally providers".into()
    }

    fn value<A: MapAccess<'de>>(&mut self, key: &'static str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "tokens_per_day" => {
                self.tokens_per_day = Some(map.next_value_seed(One(TokensPerDayP))?)
            }
            "providers" => {
                self.providers = Some(map.next_value_seed(Many::new(ProviderP, "provider"))?)
            }
            _ => unreachable!("{key} is in BUDGET.known"),
        }
        Ok(())
    }

    fn finish<E: de::Error>(self) -> Result<Budget, E> {
        let Some(tokens_per_day) = self.tokens_per_day else {
            return Err(fail(format!(
                "the budget of workload `{}` does not say how many tokens; write e.g. \
                 `tokens_per_day: 200000` (input and output tokens, per UTC day)",
                self.workload
            )));
        };
        Ok(Budget {
            workload: self.workload,
            tokens_per_day,
            providers: self.providers,
        })
    }
}

#[derive(Clone, Copy)]
struct TokensPerDayP;

impl Parse for TokensPerDayP {
    type Out = u64;
    fn expecting(&self) -> String {
        "a number of tokens per day such as 200000".into()
    }
    fn text(&self, s: &str) -> Result<u64, String> {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return self.int(t.parse::<i128>().unwrap_or(i128::MAX));
        }
        Err(format!(
            "{s:?} is not a number of tokens; write digits only, e.g. `tokens_per_day: 200000`"
        ))
    }
    fn int(&self, n: i128) -> Result<u64, String> {
        match u64::try_from(n) {
            Ok(0) => Err(
                "tokens_per_day 0 would refuse every LLM call of the workload; write a positive \
                 number, or deny its calls with a rule (`action: deny`)"
                    .into(),
            ),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "{n} is not a number of tokens; write a positive number such as 200000"
            )),
        }
    }
}
