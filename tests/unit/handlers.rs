//! Unit tests of the service layer ("high gear", cosmicpython ch. 5): every
//! command goes through `service_layer::handle` with an in-memory unit of work,
//! and the tests look at what was published through the outbox and at the
//! products. (The read model is a database view of the allocations: the
//! PostgreSQL and end-to-end tests check it.)

use allocation_worker::domain::commands::{Allocate, ChangeBatchQuantity, CreateBatch};
use allocation_worker::domain::events::{Allocated, Deallocated, OutOfStock};
use allocation_worker::domain::{BatchRef, Command, DomainError, Event, OrderId, Product, Sku};
use allocation_worker::service_layer::{handle, HandlerError, UnitOfWork};
use chrono::NaiveDate;

use testkit::fakes::FakeRepository;

// ------------------------------------------------------------------ fakes

/// Records what the handlers asked for instead of storing it. There is no
/// commit: handlers never commit, the caller of `handle` does.
#[derive(Default)]
struct FakeUnitOfWork {
    products: FakeRepository,
    published: Vec<Event>,
}

impl UnitOfWork for FakeUnitOfWork {
    type Products = FakeRepository;

    fn products(&mut self) -> &mut FakeRepository {
        &mut self.products
    }

    fn publish(&mut self, event: &Event) {
        self.published.push(event.clone());
    }
}

impl FakeUnitOfWork {
    fn product(&self, sku_: &str) -> &Product {
        self.products
            .products
            .iter()
            .find(|p| p.sku().as_str() == sku_)
            .unwrap_or_else(|| panic!("no product {sku_}"))
    }

    fn available(&self, sku_: &str, reference: &str) -> i64 {
        self.product(sku_)
            .batch(&bref(reference))
            .unwrap()
            .available_quantity()
    }

    /// Forgets what was recorded so far, keeping the products.
    fn clear_records(&mut self) {
        self.published.clear();
    }
}

// ---------------------------------------------------------------- helpers

fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap()
}

fn bref(s: &str) -> BatchRef {
    BatchRef::parse(s).unwrap()
}

fn oid(s: &str) -> OrderId {
    OrderId::parse(s).unwrap()
}

fn tomorrow() -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(2024, 3, 2)
}

fn create_batch(reference: &str, sku_: &str, qty: u32, eta: Option<NaiveDate>) -> Command {
    Command::CreateBatch(CreateBatch {
        reference: bref(reference),
        sku: sku(sku_),
        qty,
        eta,
    })
}

fn change_qty(reference: &str, qty: u32) -> Command {
    Command::ChangeBatchQuantity(ChangeBatchQuantity {
        reference: bref(reference),
        qty,
    })
}

fn allocate(orderid: &str, sku_: &str, qty: u32) -> Command {
    Command::Allocate(Allocate {
        orderid: oid(orderid),
        sku: sku(sku_),
        qty,
    })
}

fn allocated(orderid: &str, sku_: &str, qty: u32, batchref: &str) -> Event {
    Event::Allocated(Allocated {
        orderid: oid(orderid),
        sku: sku(sku_),
        qty,
        batchref: bref(batchref),
    })
}

fn deallocated(orderid: &str, sku_: &str, qty: u32) -> Event {
    Event::Deallocated(Deallocated {
        orderid: oid(orderid),
        sku: sku(sku_),
        qty,
    })
}

fn out_of_stock(orderid: &str, sku_: &str, qty: u32) -> Event {
    Event::OutOfStock(OutOfStock {
        sku: sku(sku_),
        orderid: oid(orderid),
        qty,
    })
}

/// Handles each command in turn in `uow`, panicking on the first failure.
async fn given(uow: &mut FakeUnitOfWork, commands: Vec<Command>) {
    for command in commands {
        let name = format!("{command:?}");
        handle(command, uow)
            .await
            .unwrap_or_else(|e| panic!("{name} failed: {e}"));
    }
}

// ------------------------------------------------------------ add batch

#[tokio::test]
async fn add_batch_for_new_product() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![create_batch("b1", "CRUNCHY-ARMCHAIR", 100, None)],
    )
    .await;

    let product = uow.product("CRUNCHY-ARMCHAIR");
    let batch = product.batch(&bref("b1")).unwrap();
    assert_eq!(batch.purchased_quantity(), 100);
    assert_eq!(batch.eta(), None);
    assert_eq!(product.version_number(), 1);
    assert!(uow.published.is_empty());
}

#[tokio::test]
async fn add_batch_for_existing_product() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "GARISH-RUG", 100, None),
            create_batch("b2", "GARISH-RUG", 99, tomorrow()),
        ],
    )
    .await;

    assert_eq!(uow.products.products.len(), 1);
    let refs: Vec<&str> = uow
        .product("GARISH-RUG")
        .batches()
        .iter()
        .map(|b| b.reference().as_str())
        .collect();
    assert_eq!(refs, ["b1", "b2"]);
    assert_eq!(uow.product("GARISH-RUG").version_number(), 2);
}

#[tokio::test]
async fn add_identical_batch_again_is_a_no_op() {
    let mut uow = FakeUnitOfWork::default();
    given(&mut uow, vec![create_batch("b1", "RUG", 100, tomorrow())]).await;
    let before = uow.product("RUG").clone();

    handle(create_batch("b1", "RUG", 100, tomorrow()), &mut uow)
        .await
        .unwrap();

    assert_eq!(uow.product("RUG"), &before);
    assert_eq!(uow.product("RUG").version_number(), 1);
    assert!(uow.published.is_empty());
}

#[tokio::test]
async fn add_batch_with_existing_ref_and_different_data_is_rejected() {
    let mut uow = FakeUnitOfWork::default();
    given(&mut uow, vec![create_batch("b1", "RUG", 100, None)]).await;
    let before = uow.product("RUG").clone();

    for cmd in [
        create_batch("b1", "RUG", 50, None),
        create_batch("b1", "RUG", 100, tomorrow()),
    ] {
        let err = handle(cmd, &mut uow).await.unwrap_err();
        assert!(
            matches!(&err, HandlerError::Rejected(DomainError::DuplicateBatch(r)) if r == &bref("b1")),
            "got {err:?}"
        );
    }
    assert_eq!(uow.product("RUG"), &before);
}

#[tokio::test]
async fn the_creating_batch_again_after_quantity_changes_is_a_no_op() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "RUG", 100, tomorrow()),
            Command::ChangeBatchQuantity(ChangeBatchQuantity {
                reference: bref("b1"),
                qty: 40,
            }),
        ],
    )
    .await;
    let before = uow.product("RUG").clone();

    handle(create_batch("b1", "RUG", 100, tomorrow()), &mut uow)
        .await
        .unwrap();
    assert_eq!(uow.product("RUG"), &before);
    assert_eq!(
        uow.product("RUG")
            .batch(&bref("b1"))
            .unwrap()
            .purchased_quantity(),
        40
    );

    // Its current quantity is not the creating message's.
    let err = handle(create_batch("b1", "RUG", 40, tomorrow()), &mut uow)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HandlerError::Rejected(DomainError::DuplicateBatch(r)) if r == &bref("b1")),
        "got {err:?}"
    );
    assert_eq!(uow.product("RUG"), &before);
}

#[tokio::test]
async fn add_batch_with_ref_of_another_skus_batch_is_rejected() {
    let mut uow = FakeUnitOfWork::default();
    given(&mut uow, vec![create_batch("b1", "RUG", 100, None)]).await;
    let before = uow.product("RUG").clone();

    let err = handle(create_batch("b1", "LAMP", 100, None), &mut uow)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, HandlerError::Rejected(DomainError::DuplicateBatch(r)) if r == &bref("b1")),
        "got {err:?}"
    );
    assert_eq!(uow.product("RUG"), &before);
    let holders = uow
        .products
        .products
        .iter()
        .filter(|p| p.batch(&bref("b1")).is_some())
        .count();
    assert_eq!(holders, 1, "the ref must stay unique across products");
}

// ------------------------------------------------------------- allocate

#[tokio::test]
async fn allocate_allocates_and_records_the_allocation() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("batch1", "COMPLICATED-LAMP", 100, None),
            allocate("o1", "COMPLICATED-LAMP", 10),
        ],
    )
    .await;

    let product = uow.product("COMPLICATED-LAMP");
    let (batch, line) = product.allocation_of(&oid("o1")).unwrap();
    assert_eq!(batch.reference(), &bref("batch1"));
    assert_eq!(line.qty, 10);
    assert_eq!(uow.available("COMPLICATED-LAMP", "batch1"), 90);
    assert_eq!(
        uow.published,
        [allocated("o1", "COMPLICATED-LAMP", 10, "batch1")]
    );
    assert_eq!(product.version_number(), 2);
}

#[tokio::test]
async fn allocate_prefers_warehouse_stock_to_shipments() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("shipment", "CLOCK", 100, tomorrow()),
            create_batch("warehouse", "CLOCK", 100, None),
            allocate("o1", "CLOCK", 10),
        ],
    )
    .await;

    assert_eq!(uow.published, [allocated("o1", "CLOCK", 10, "warehouse")]);
}

#[tokio::test]
async fn allocate_errors_for_invalid_sku() {
    let mut uow = FakeUnitOfWork::default();
    given(&mut uow, vec![create_batch("b1", "AREALSKU", 100, None)]).await;

    let err = handle(allocate("o1", "NONEXISTENTSKU", 10), &mut uow)
        .await
        .unwrap_err();

    assert!(
        matches!(&err, HandlerError::UnknownSku(s) if s == &sku("NONEXISTENTSKU")),
        "got {err:?}"
    );
    assert_eq!(err.to_string(), "unknown SKU NONEXISTENTSKU");
    assert!(uow.published.is_empty());
}

#[tokio::test]
async fn allocate_publishes_out_of_stock_and_changes_nothing_when_no_batch_fits() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "FORK", 5, None),
            create_batch("b2", "FORK", 5, tomorrow()),
        ],
    )
    .await;
    let before = uow.product("FORK").clone();

    handle(allocate("o1", "FORK", 6), &mut uow).await.unwrap();

    assert_eq!(uow.published, [out_of_stock("o1", "FORK", 6)]);
    assert_eq!(uow.product("FORK"), &before);
}

#[tokio::test]
async fn allocate_same_line_again_with_same_qty_changes_nothing_and_publishes_nothing() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "LAMP", 100, None),
            allocate("o1", "LAMP", 10),
        ],
    )
    .await;
    uow.clear_records();
    let before = uow.product("LAMP").clone();

    handle(allocate("o1", "LAMP", 10), &mut uow).await.unwrap();

    assert!(uow.published.is_empty());
    assert_eq!(uow.product("LAMP"), &before);
}

#[tokio::test]
async fn allocate_same_line_again_with_other_qty_is_rejected_as_duplicate_line() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "LAMP", 100, None),
            allocate("o1", "LAMP", 10),
        ],
    )
    .await;
    uow.clear_records();
    let before = uow.product("LAMP").clone();

    let err = handle(allocate("o1", "LAMP", 5), &mut uow)
        .await
        .unwrap_err();

    match err {
        HandlerError::Rejected(DomainError::DuplicateLine {
            orderid,
            sku: s,
            allocated,
            requested,
        }) => {
            assert_eq!((orderid, s), (oid("o1"), sku("LAMP")));
            assert_eq!((allocated, requested), (10, 5));
        }
        other => panic!("expected DuplicateLine, got {other:?}"),
    }
    assert!(uow.published.is_empty());
    assert_eq!(uow.product("LAMP"), &before);
}

#[tokio::test]
async fn same_orderid_for_two_skus_is_two_lines() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b-lamp", "LAMP", 10, None),
            create_batch("b-rug", "RUG", 10, None),
            allocate("o1", "LAMP", 3),
            allocate("o1", "RUG", 4),
        ],
    )
    .await;

    assert_eq!(
        uow.published,
        [
            allocated("o1", "LAMP", 3, "b-lamp"),
            allocated("o1", "RUG", 4, "b-rug"),
        ]
    );
    assert_eq!(uow.available("LAMP", "b-lamp"), 7);
    assert_eq!(uow.available("RUG", "b-rug"), 6);
}

// ------------------------------------------------ change batch quantity

#[tokio::test]
async fn change_quantity_of_unknown_batch_errors() {
    let mut uow = FakeUnitOfWork::default();
    given(&mut uow, vec![create_batch("b1", "LAMP", 100, None)]).await;

    let err = handle(change_qty("nope", 10), &mut uow).await.unwrap_err();

    assert!(
        matches!(&err, HandlerError::UnknownBatch(r) if r == &bref("nope")),
        "got {err:?}"
    );
    assert_eq!(
        uow.product("LAMP")
            .batch(&bref("b1"))
            .unwrap()
            .purchased_quantity(),
        100
    );
}

#[tokio::test]
async fn change_quantity_changes_available_quantity() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![create_batch("batch1", "ADORABLE-SETTEE", 100, None)],
    )
    .await;
    assert_eq!(uow.available("ADORABLE-SETTEE", "batch1"), 100);

    handle(change_qty("batch1", 50), &mut uow).await.unwrap();

    assert_eq!(uow.available("ADORABLE-SETTEE", "batch1"), 50);
    assert_eq!(uow.product("ADORABLE-SETTEE").version_number(), 2);
    assert!(uow.published.is_empty());
}

#[tokio::test]
async fn change_quantity_to_same_value_changes_nothing() {
    let mut uow = FakeUnitOfWork::default();
    given(&mut uow, vec![create_batch("b1", "LAMP", 100, None)]).await;
    let before = uow.product("LAMP").clone();

    handle(change_qty("b1", 100), &mut uow).await.unwrap();

    assert_eq!(uow.product("LAMP"), &before);
}

#[tokio::test]
async fn change_quantity_reallocates_if_necessary() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("batch1", "INDIFFERENT-TABLE", 50, None),
            create_batch("batch2", "INDIFFERENT-TABLE", 50, tomorrow()),
            allocate("order1", "INDIFFERENT-TABLE", 20),
            allocate("order2", "INDIFFERENT-TABLE", 20),
        ],
    )
    .await;
    assert_eq!(uow.available("INDIFFERENT-TABLE", "batch1"), 10);
    assert_eq!(uow.available("INDIFFERENT-TABLE", "batch2"), 50);
    let version = uow.product("INDIFFERENT-TABLE").version_number();
    uow.clear_records();

    handle(change_qty("batch1", 25), &mut uow).await.unwrap();

    assert_eq!(uow.available("INDIFFERENT-TABLE", "batch1"), 5);
    assert_eq!(uow.available("INDIFFERENT-TABLE", "batch2"), 30);
    assert_eq!(
        uow.published,
        [
            deallocated("order2", "INDIFFERENT-TABLE", 20),
            allocated("order2", "INDIFFERENT-TABLE", 20, "batch2"),
        ]
    );
    // The quantity change and the reallocation are two changes.
    assert_eq!(
        uow.product("INDIFFERENT-TABLE").version_number(),
        version + 2
    );
}

#[tokio::test]
async fn quantity_drop_frees_lines_lifo_and_reallocates_each_or_reports_out_of_stock() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("warehouse", "LAMP", 30, None),
            create_batch("shipment", "LAMP", 15, tomorrow()),
            allocate("o1", "LAMP", 10),
            allocate("o2", "LAMP", 10),
            allocate("o3", "LAMP", 10),
        ],
    )
    .await;
    uow.clear_records();

    // 30 -> 10: frees o3 then o2 (LIFO); o1 stays. The shipment takes o3
    // (15 -> 5 left) and then has no room for o2.
    handle(change_qty("warehouse", 10), &mut uow).await.unwrap();

    let product = uow.product("LAMP");
    let where_is = |o: &str| {
        product
            .allocation_of(&oid(o))
            .map(|(b, _)| b.reference().to_string())
    };
    assert_eq!(where_is("o1").as_deref(), Some("warehouse"));
    assert_eq!(where_is("o3").as_deref(), Some("shipment"));
    assert_eq!(where_is("o2"), None);
    assert_eq!(uow.available("LAMP", "warehouse"), 0);
    assert_eq!(uow.available("LAMP", "shipment"), 5);

    let mut published = uow.published.clone();
    published.sort_by_key(|e| format!("{e:?}"));
    let mut expected = vec![
        deallocated("o3", "LAMP", 10),
        deallocated("o2", "LAMP", 10),
        allocated("o3", "LAMP", 10, "shipment"),
        out_of_stock("o2", "LAMP", 10),
    ];
    expected.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(published, expected);
    // LIFO: o3 is freed before o2, and each line's Deallocated comes before
    // what was decided for it afterwards.
    let pos = |e: &Event| uow.published.iter().position(|p| p == e).unwrap();
    assert!(pos(&deallocated("o3", "LAMP", 10)) < pos(&deallocated("o2", "LAMP", 10)));
    assert!(pos(&deallocated("o3", "LAMP", 10)) < pos(&allocated("o3", "LAMP", 10, "shipment")));
    assert!(pos(&deallocated("o2", "LAMP", 10)) < pos(&out_of_stock("o2", "LAMP", 10)));
}

#[tokio::test]
async fn a_freed_line_is_reallocated_by_the_normal_rule_even_into_its_old_batch() {
    // 45 with lines 20, 5, 20; drop to 10: LIFO frees all three (the batch is
    // still short after the last 20 and the 5). Re-allocating by the normal
    // rule, the 5 fits back into the warehouse, the 20s go to the shipment.
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("warehouse", "LAMP", 45, None),
            create_batch("shipment", "LAMP", 40, tomorrow()),
            allocate("a", "LAMP", 20),
            allocate("b", "LAMP", 5),
            allocate("c", "LAMP", 20),
        ],
    )
    .await;
    uow.clear_records();

    handle(change_qty("warehouse", 10), &mut uow).await.unwrap();

    let product = uow.product("LAMP");
    let at = |r: &str| -> Vec<String> {
        product
            .batch(&bref(r))
            .unwrap()
            .allocations()
            .iter()
            .map(|l| l.orderid.to_string())
            .collect()
    };
    assert_eq!(at("warehouse"), ["b"]);
    let mut shipment = at("shipment");
    shipment.sort();
    assert_eq!(shipment, ["a", "c"]);
    let deallocs: Vec<&Event> = uow
        .published
        .iter()
        .filter(|e| matches!(e, Event::Deallocated(_)))
        .collect();
    assert_eq!(
        deallocs,
        [
            &deallocated("c", "LAMP", 20),
            &deallocated("b", "LAMP", 5),
            &deallocated("a", "LAMP", 20),
        ]
    );
    assert!(uow
        .published
        .contains(&allocated("b", "LAMP", 5, "warehouse")));
    assert_eq!(uow.published.len(), 6);
}

#[tokio::test]
async fn a_cascade_leaves_every_line_where_the_rule_puts_it() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "LAMP", 20, None),
            create_batch("b2", "LAMP", 20, tomorrow()),
            allocate("o1", "LAMP", 10),
            allocate("o2", "LAMP", 10),
            change_qty("b1", 5),
            allocate("o3", "LAMP", 5),
        ],
    )
    .await;

    let mut actual: Vec<(String, String)> = uow
        .product("LAMP")
        .batches()
        .iter()
        .flat_map(|b| {
            b.allocations()
                .iter()
                .map(|l| (l.orderid.to_string(), b.reference().to_string()))
        })
        .collect();
    actual.sort();
    assert_eq!(
        actual,
        [
            ("o1".to_string(), "b2".to_string()),
            ("o2".to_string(), "b2".to_string()),
            ("o3".to_string(), "b1".to_string()),
        ]
    );
}

#[tokio::test]
async fn version_bumps_once_per_change_across_handlers() {
    let mut uow = FakeUnitOfWork::default();
    given(
        &mut uow,
        vec![
            create_batch("b1", "LAMP", 10, None),       // 1
            create_batch("b2", "LAMP", 10, tomorrow()), // 2
            allocate("o1", "LAMP", 10),                 // 3
            allocate("o2", "LAMP", 10),                 // 4
            allocate("o3", "LAMP", 10),                 // out of stock: no change
            create_batch("b1", "LAMP", 10, None),       // identical: no change
        ],
    )
    .await;
    assert_eq!(uow.product("LAMP").version_number(), 4);

    // Change (5), then o1 freed: b2 is full, so out of stock, no change.
    handle(change_qty("b1", 0), &mut uow).await.unwrap();
    assert_eq!(uow.product("LAMP").version_number(), 5);
}
