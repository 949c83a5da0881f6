//! Scale-out on a cluster scheduler: which part of a job this process is, from a Slurm job
//! array's environment (`sbatch --array=0-7`: `SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`,
//! `SLURM_ARRAY_TASK_MIN`). `saev activations --part auto` and `saev train --group auto` use
//! it; `scripts/slurm/` has the array scripts.
//!
//! ```no_run
//! let (i, n) = saev::cluster::array_task()?;   // e.g. (3, 8) in task 3 of --array=0-7
//! # Ok::<(), saev::Error>(())
//! ```

use crate::error::{Error, Result};

/// `(i, n)`: this task's 0-based index and the number of tasks of the Slurm job array it runs
/// in. Arrays that do not start at 0 (`--array=1-8`) are shifted by `SLURM_ARRAY_TASK_MIN`;
/// arrays with gaps or steps (`--array=0,2,5`, `0-15:4`) are refused, since their tasks would
/// not cover every part.
pub fn array_task() -> Result<(usize, usize)> {
    array_task_from(|k| std::env::var(k).ok())
}

pub(crate) fn array_task_from(var: impl Fn(&str) -> Option<String>) -> Result<(usize, usize)> {
    let num = |k: &str| -> Result<Option<usize>> {
        match var(k) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| Error::Setup {
                    problem: format!("{k}={v:?} is not a number"),
                    fix: "run inside a Slurm job array (sbatch --array=0-N)".into(),
                }),
        }
    };
    let (Some(id), Some(count)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?)
    else {
        return Err(Error::Setup {
            problem: "`auto` needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (not in a Slurm job array)".into(),
            fix: "submit with sbatch --array=0-N (see scripts/slurm/), or give the part as I/N".into(),
        });
    };
    let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let max = num("SLURM_ARRAY_TASK_MAX")?;
    if let Some(max) = max {
        if max.checked_sub(min).map(|s| s + 1) != Some(count) {
            return Err(Error::Setup {
                problem: format!(
                    "the job array {min}-{max} has {count} tasks: gaps or steps leave parts undone"
                ),
                fix: "use a contiguous array, sbatch --array=0-N".into(),
            });
        }
    }
    let i = id.checked_sub(min).filter(|&i| i < count).ok_or_else(|| {
        Error::out_of_range(
            "SLURM_ARRAY_TASK_ID",
            id,
            format!("{min}..{} (SLURM_ARRAY_TASK_MIN + COUNT)", min + count),
        )
    })?;
    Ok((i, count))
}

/// Part `i` of `n` contiguous parts of `0..len`: `⌈len/n⌉` each, the last ones shorter (as
/// every saev release has split, so runs split before keep their parts) — unless that leaves a
/// part empty while `len ≥ n` (9 into 4 gave 3, 3, 3, 0): then sizes differing by at most one,
/// the larger first (3, 2, 2, 2). Parts are empty only when `n > len`.
pub(crate) fn contiguous_part(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    let n = n.max(1);
    let per = len.div_ceil(n);
    if (n - 1) * per < len || len < n {
        return (i * per).min(len)..((i + 1) * per).min(len);
    }
    let (q, r) = (len / n, len % n);
    let at = |j: usize| (j * q + j.min(r)).min(len);
    at(i)..at(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
    }

    /// Every split covers `0..len` in order, without gaps or overlaps; no part is empty while
    /// `len ≥ n`; the splits that had no empty part are as before (`⌈len/n⌉` each).
    #[test]
    fn contiguous_parts_cover_everything_and_none_is_empty() {
        for len in 0..40usize {
            for n in 1..12usize {
                let parts: Vec<_> = (0..n).map(|i| contiguous_part(len, n, i)).collect();
                let mut next = 0;
                for p in &parts {
                    assert_eq!(p.start, next, "len {len} n {n}: {parts:?}");
                    next = p.end;
                }
                assert_eq!(next, len, "len {len} n {n}: {parts:?}");
                if len >= n {
                    assert!(
                        parts.iter().all(|p| !p.is_empty()),
                        "len {len} n {n}: {parts:?}"
                    );
                    let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                    let per = len.div_ceil(n);
                    if (n - 1) * per < len {
                        assert!(sizes[..n - 1].iter().all(|&s| s == per), "{sizes:?}");
                    } else {
                        let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{sizes:?}");
                    }
                }
            }
        }
        assert_eq!(
            (0..4)
                .map(|i| contiguous_part(9, 4, i).len())
                .collect::<Vec<_>>(),
            [3, 2, 2, 2]
        );
        assert_eq!(
            (0..2).map(|i| contiguous_part(9, 2, i)).collect::<Vec<_>>(),
            [0..5, 5..9]
        );
    }

    #[test]
    fn task_index_and_count_from_slurm() {
        let f = array_task_from;
        let ok = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(f(env(&ok)).unwrap(), (2, 3));
        // --array=1-3: shifted to 0-based.
        let one = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
        ];
        assert_eq!(f(env(&one)).unwrap(), (0, 3));
        // Not in an array, gaps, garbage: clear errors.
        assert!(f(env(&[]))
            .unwrap_err()
            .to_string()
            .contains("sbatch --array"));
        let gaps = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "5"),
        ];
        assert!(f(env(&gaps)).unwrap_err().to_string().contains("gaps"));
        let bad = [
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert!(f(env(&bad))
            .unwrap_err()
            .to_string()
            .contains("not a number"));
        let past = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert!(f(env(&past)).is_err());
    }
}
