//! The tokens each workload's LLM calls used today (UTC), for the policy's
//! `budgets:` ([`crate::policy::Budget`]).
//!
//! One ledger per agent, held by the audit sink: it outlives policy
//! reloads, and a new budget applies to what the workload already used
//! today. A call counts when its answer ends (or the app leaves it), with
//! the usage the provider reported, or an estimate where it reported none
//! ([`tokens_of`]). The proxy checks the budget before a call leaves the
//! host; calls already in flight when it is reached still finish, so a day
//! may end a little over its budget.
//!
//! An agent that restarts learns what the day's earlier calls used from its
//! audit files: on the first check, it sums the `requests` rows of the UTC
//! day that ended before the ledger was made (the rows of earlier agents,
//! journals of dead agents included, which the audit writer has written to
//! Parquet by then), with the same estimate. Everything after that is
//! counted here, as it ends.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use arrow::array::{Array, AsArray, types::Int64Type};
use chrono::{DateTime, Days, NaiveDate, Utc};
use tokio::sync::OnceCell;

use crate::{
    audit::{RequestRow, query::AuditQuery},
    metrics::Metrics,
    policy::{Budget, LLM_PROVIDERS},
};

/// Bytes of text per estimated token: the usual rule of thumb for English
/// with OpenAI's and Anthropic's tokenizers (more tokens per byte for code
/// and other languages).
pub const BYTES_PER_TOKEN: u64 = 4;

type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub struct TokenLedger {
    clock: Clock,
    /// Calls that ended before this are in the audit files of earlier
    /// agents; the later ones are counted here.
    since: DateTime<Utc>,
    /// The audit directory to learn the day's earlier spend from.
    dir: Option<PathBuf>,
    seeded: OnceCell<()>,
    day: Mutex<Day>,
    metrics: Option<Arc<Metrics>>,
}

struct Day {
    date: NaiveDate,
    /// (workload, provider) to tokens.
    spent: HashMap<(String, &'static str), u64>,
}

/// A budget that is spent: what the proxy tells the app.
#[derive(Debug, PartialEq, Eq)]
pub struct OverBudget {
    pub spent: u64,
    /// The next UTC midnight.
    pub resets: DateTime<Utc>,
}

impl OverBudget {
    /// The message the app's SDK shows.
    pub fn message(&self, budget: &Budget) -> String {
        let providers = budget
            .providers
            .as_ref()
            .map(|p| format!(" for {}", p.join(" and ")))
            .unwrap_or_default();
        format!(
            "workload {:?} has used {} of its daily budget of {} LLM tokens{providers} (Warden \
             policy, budgets:); it resets at {} (midnight UTC)",
            budget.workload,
            self.spent,
            budget.tokens_per_day,
            self.resets.format("%Y-%m-%dT%H:%M:%SZ"),
        )
    }
}

/// The tokens a call's row counts for: the usage the provider reported,
/// else, for a successful (2xx) answer, an estimate of
/// [`BYTES_PER_TOKEN`] bytes per token: `prompt_bytes` (of the prompt as
/// sent) for the input, the answer's text and tool calls for the output.
/// A call that failed without usage counts nothing.
pub fn tokens_of(row: &RequestRow, prompt_bytes: usize) -> u64 {
    let Some(llm) = &row.llm else { return 0 };
    let answered = row
        .http
        .as_ref()
        .and_then(|h| h.status)
        .is_some_and(|s| (200..300).contains(&s));
    let estimate = |bytes: usize| {
        if answered {
            (bytes as u64).div_ceil(BYTES_PER_TOKEN)
        } else {
            0
        }
    };
    let answer_bytes = llm.response.as_ref().map_or(0, String::len)
        + llm.tool_calls.iter().map(String::len).sum::<usize>();
    llm.input_tokens.unwrap_or_else(|| estimate(prompt_bytes))
        + llm.output_tokens.unwrap_or_else(|| estimate(answer_bytes))
}

impl TokenLedger {
    /// A ledger that learns the day's earlier spend from the audit files in
    /// `dir` (none: starts from zero).
    pub fn new(dir: Option<PathBuf>, metrics: Option<Arc<Metrics>>) -> TokenLedger {
        TokenLedger::with_clock(dir, metrics, Arc::new(Utc::now))
    }

    fn with_clock(dir: Option<PathBuf>, metrics: Option<Arc<Metrics>>, clock: Clock) -> Self {
        let since = clock();
        TokenLedger {
            since,
            dir,
            seeded: OnceCell::new(),
            day: Mutex::new(Day {
                date: since.date_naive(),
                spent: HashMap::new(),
            }),
            metrics,
            clock,
        }
    }

    /// Counts an LLM call whose answer ended now: [`tokens_of`] its row.
    /// A call of no workload counts for no budget.
    pub fn spend(&self, row: &RequestRow, prompt_bytes: usize) {
        let (Some(workload), Some(llm)) = (&row.workload, &row.llm) else {
            return;
        };
        let tokens = tokens_of(row, prompt_bytes);
        if tokens == 0 {
            return;
        }
        self.add(workload, llm.provider, tokens);
        if let Some(m) = &self.metrics {
            m.llm_tokens(workload, llm.provider, tokens);
        }
    }

    fn add(&self, workload: &str, provider: &'static str, tokens: u64) {
        let mut day = self.today();
        let spent = day
            .spent
            .entry((workload.to_string(), provider))
            .or_default();
        *spent = spent.saturating_add(tokens);
    }

    /// The day's counters, emptied first when the UTC day has changed.
    fn today(&self) -> std::sync::MutexGuard<'_, Day> {
        let date = (self.clock)().date_naive();
        let mut day = self.day.lock().expect("ledger lock");
        if day.date != date {
            day.date = date;
            day.spent.clear();
        }
        day
    }

    /// What `budget`'s workload used today, on the providers it counts.
    pub fn spent(&self, budget: &Budget) -> u64 {
        self.today()
            .spent
            .iter()
            .filter(|((w, p), _)| *w == budget.workload && budget.covers(p))
            .map(|(_, n)| *n)
            .fold(0, u64::saturating_add)
    }

    /// Whether the day's calls from before the ledger was made are counted
    /// yet (they are read from the audit on the first check).
    pub fn has_earlier_calls(&self) -> bool {
        self.dir.is_none() || self.seeded.initialized()
    }

    /// Whether `budget`'s workload may make another call to `provider`:
    /// refused once today's spend has reached the budget. The first check
    /// learns the day's earlier spend from the audit first.
    pub async fn check(&self, budget: &Budget, provider: &str) -> Result<(), OverBudget> {
        if !budget.covers(provider) {
            return Ok(());
        }
        self.seeded.get_or_init(|| self.seed()).await;
        let spent = self.spent(budget);
        if spent < budget.tokens_per_day {
            return Ok(());
        }
        let tomorrow = (self.clock)()
            .date_naive()
            .checked_add_days(Days::new(1))
            .expect("a date before the end of time");
        Err(OverBudget {
            spent,
            resets: tomorrow.and_time(chrono::NaiveTime::MIN).and_utc(),
        })
    }

    /// Adds the tokens of the day's calls that ended before the ledger was
    /// made, from the audit files. Without them the day starts from zero:
    /// said in the agent's log, never a reason to refuse calls.
    async fn seed(&self) {
        let Some(dir) = &self.dir else { return };
        let date = self.since.date_naive();
        match earlier_spend(dir, date, self.since).await {
            Ok(rows) => {
                let mut day = self.today();
                if day.date != date {
                    return;
                }
                for (workload, provider, tokens) in rows {
                    let spent = day.spent.entry((workload, provider)).or_default();
                    *spent = spent.saturating_add(tokens);
                }
            }
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                "cannot read today's LLM token use from the audit, so budgets count from zero \
                 since the agent started: {e}"
            ),
        }
    }
}

/// (workload, provider, tokens) of the LLM calls of `date` (UTC) that ended
/// before `until`, from the `requests` rows in `dir`, counted as
/// [`tokens_of`] counts them (the prompt as the audit kept it: none under
/// `prompts: digest` or `none`).
async fn earlier_spend(
    dir: &std::path::Path,
    date: NaiveDate,
    until: DateTime<Utc>,
) -> anyhow::Result<Vec<(String, &'static str, u64)>> {
    let query = AuditQuery::open(dir)?;
    let start = date.and_time(chrono::NaiveTime::MIN).and_utc();
    // A call is partitioned by its start, and counts on the day it ends.
    let yesterday = date.checked_sub_days(Days::new(1)).unwrap_or(date);
    let estimate = |bytes: &str| {
        format!(
            "CASE WHEN http_status BETWEEN 200 AND 299 \
             THEN CAST(ceil(CAST({bytes} AS DOUBLE) / {BYTES_PER_TOKEN}) AS BIGINT) ELSE 0 END"
        )
    };
    let input = estimate("octet_length(coalesce(prompt, ''))");
    let output = estimate(
        "octet_length(coalesce(response, '')) \
         + octet_length(coalesce(array_to_string(tool_calls, ''), ''))",
    );
    let sql = format!(
        "SELECT workload, llm_provider, \
           CAST(sum(coalesce(input_tokens, {input}) + coalesce(output_tokens, {output})) AS BIGINT) AS tokens \
         FROM requests \
         WHERE protocol = 'llm' AND decision = 'allow' AND workload IS NOT NULL \
           AND date >= DATE '{yesterday}' \
           AND end_time >= to_timestamp_micros({start}) AND end_time < to_timestamp_micros({until}) \
         GROUP BY workload, llm_provider",
        start = start.timestamp_micros(),
        until = until.timestamp_micros(),
    );
    let batch = query.collect(&sql).await?;
    let workloads = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
    let providers = arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Utf8)?;
    let (workloads, providers) = (workloads.as_string::<i32>(), providers.as_string::<i32>());
    let tokens = batch.column(2).as_primitive::<Int64Type>();
    let mut out = Vec::new();
    for i in 0..batch.num_rows() {
        let provider = LLM_PROVIDERS
            .iter()
            .find(|&&p| !providers.is_null(i) && p == providers.value(i));
        if let (Some(&provider), false) = (provider, tokens.is_null(i)) {
            let n = u64::try_from(tokens.value(i)).unwrap_or(0);
            out.push((workloads.value(i).to_string(), provider, n));
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
